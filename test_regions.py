"""regions.py, the account of a training step's time: every profiled op lands in the region it
belongs to, and its toggles change what they say and nothing else."""
import torch

import regions
import routers
import softmax_routers
from model import GPT, GPTConfig


def tiny(router='topk'):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4, top_k=2, router=router,
                         block_size=8, vocab_size=64))


def test_every_op_of_an_moe_step_lands_in_its_region():
    model = tiny()
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95))
    idx = torch.randint(0, 64, (2, 8))

    def step():
        _, loss, _ = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    ms = regions.profile_regions(step, 2)
    assert set(ms) == set(regions.REGIONS)
    for r in ('matmuls', 'attention (SDPA)', 'experts: element-wise', 'experts: gathers, scatters, zeros',
              'experts: listing pairs', 'experts: Python, views', 'router ops left to ATen', 'optimizer'):
        assert ms[r] > 0, r
    assert ms['inductor kernels'] == 0  # eager: nothing compiled


def test_load_only_statistics_keep_the_loss_and_the_load_and_are_undone():
    model = tiny('remoe')
    idx = torch.randint(0, 64, (2, 8))
    _, loss, info = model(idx, idx)
    with regions.load_only_stats():
        _, cut_loss, cut_info = model(idx, idx)
    assert set(cut_info) == {'load', 'dropped', 'lm_loss', 'aux_loss'}  # ReMoE adds 'dropped' itself
    assert torch.equal(cut_loss, loss) and torch.equal(cut_info['load'], info['load'])
    assert routers.routing_stats is softmax_routers.routing_stats  # put back, everywhere
    assert 'entropy' in model(idx, idx)[2]


def test_the_dense_stand_in_has_the_active_flops_of_the_experts():
    model = tiny()
    regions.dense_experts(model)
    _, loss, _ = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    for block in model.transformer.h:
        experts = block.mlp.experts
        assert experts.w_in.shape == (16, 2 * 2 * 16) and experts.w_out.shape == (2 * 16, 16)  # K * H = 32
        assert experts.w_in.grad is not None and block.mlp.router.w_g.weight.grad is not None
