"""
RMoE's recurrent router: the state carried from layer to layer, the recurrent gradient, the shared
GRU. Beside test_routers.py.
"""

import pytest
import torch

from model import GPT, GPTConfig


def rmoe_routers(router='topk', n_layer=3, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=n_layer, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=2, router=router,
                       recurrent_router=True, rmoe_dim=6, block_size=8, vocab_size=32)
    model = GPT(config)
    return model, [b.mlp.router for b in model.transformer.h]


@pytest.mark.parametrize('router', ['topk', 'remoe'])
def test_rmoe_recurrent_gradient_reaches_the_first_projector_unless_detached(router):
    _, routers = rmoe_routers(router)
    xs = [torch.randn(5, 8) for _ in routers]  # independent inputs: only the state links the layers
    w = torch.randn(5, 4)
    for detach in (False, True):
        state = None
        for r, x in zip(routers, xs):
            gates, _, _, state = r(x, state.detach() if detach and state is not None else state)
        (grad,) = torch.autograd.grad((gates * w).sum(), routers[0].proj.weight, allow_unused=True)
        if detach:
            assert grad is None or torch.count_nonzero(grad) == 0
        else:
            assert grad is not None and grad.abs().sum() > 0


def test_rmoe_shares_one_gru_and_counts_it_once():
    model, routers = rmoe_routers(n_layer=3)
    assert routers[0].gru is routers[1].gru is routers[2].gru
    p, D, E = 6, 8, 4
    gru = 3 * (2 * p * p + 2 * p)
    per_layer = p * D + p * E  # projector and router
    n_router = sum(x.numel() for n, x in model.named_parameters() if '.router.' in n)
    assert n_router == 3 * per_layer + gru
    assert routers[0].gru.weight_ih.std().item() == pytest.approx(0.02, rel=0.3)  # explicit init


def test_rmoe_state_passes_through_dense_layers():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=2, moe_every=2,
                       recurrent_router=True, rmoe_dim=6, block_size=8, vocab_size=32)
    model = GPT(config)
    idx = torch.randint(0, 32, (2, 8))
    _, loss, info = model(idx, idx)
    assert info['load'].shape == (2, 4)
    loss.backward()
    first_proj = model.transformer.h[1].mlp.router.proj.weight  # block 1 is the first MoE block
    assert first_proj.grad.abs().sum() > 0
