"""
Load balancing without a loss (balance='bias', DeepSeek's auxiliary-loss-free balancing) and
shared experts (n_shared_expert): the bias steers selection only, balances a skewed router, and
lives through checkpoints, casts and resumes; shared experts keep every backend equal to loop
and the parameter counts exact. (Expert parallelism: test_distributed.py.)
"""
import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from pairs import swiglu
import sample
from model import GPT, MLP, GPTConfig, MoE
from routers import make_router
from conftest import read_log, regression_steps, train


def router_pair(router, E, K, D, seed, **extra):
    """The same router weights twice: balance='bias' (its bias returned) and balance='none'."""
    torch.manual_seed(seed)
    config = dict(n_embd=D, n_head=1, n_layer=1, n_expert=E, top_k=K, router=router, **extra)
    biased = make_router(GPTConfig(balance='bias', **config))
    plain = make_router(GPTConfig(balance='none', **config))
    plain.load_state_dict(biased.state_dict(), strict=False)  # all but the bias
    return biased, plain


@pytest.mark.parametrize('router', ['topk', 'prototype'])
@given(N=st.integers(1, 24), seed=st.integers(0, 2**16), scale=st.floats(0.01, 10))
def test_bias_steers_selection_and_never_gate_values_or_gradients(router, N, seed, scale):
    E, K, D = 8, 2, 6
    biased, plain = router_pair(router, E, K, D, seed)
    gen = torch.Generator().manual_seed(seed)
    biased.bias.copy_(scale * torch.randn(E, generator=gen))
    x = torch.randn(N, D, generator=gen)
    gates, aux_loss, stats, _ = biased(x)
    probs = plain.logits(x, None)[0]  # [N, E]
    probs = probs.softmax(-1) if router == 'topk' else probs.view(N, K, E // K).softmax(-1).view(N, E)
    # selection: top-k (per group top-1) of probs + bias; values: probs, untouched by the bias
    scores = (probs + biased.bias).view(N, -1 if router == 'topk' else K, E if router == 'topk' else E // K)
    chosen = torch.zeros(N, E, dtype=torch.bool)
    if router == 'topk':
        chosen.scatter_(1, scores.view(N, E).topk(K, -1).indices, True)
    else:
        chosen.view(N, K, E // K).scatter_(2, scores.argmax(-1, keepdim=True), True)
    assert torch.equal(gates > 0, chosen)
    torch.testing.assert_close(gates[chosen], probs[chosen])
    assert aux_loss.item() == 0 and stats['bias'].shape == (E,)
    # the bias is no parameter and gets no gradient; the router still learns through the gate values
    gates.sum().backward()
    assert not biased.bias.requires_grad and biased.bias.grad is None
    assert 'bias' not in dict(biased.named_parameters()) and 'bias' in biased.state_dict()
    assert biased.w_g.weight.grad is not None


@pytest.mark.parametrize('router', ['topk', 'prototype'])
def test_bias_balances_a_skewed_router_step_after_step(router):
    """A layer learning a regression with its router skewed towards experts 0 and 4: under 'bias'
    the load's spread (CV over the experts, averaged over 20-step windows) falls window after
    window to under 0.4 of where it started; under 'none' it stays where it was."""
    E, K, D, steps = 8, 2, 16, 320
    cvs = {}
    for balance in ('bias', 'none'):
        torch.manual_seed(0)
        config = GPTConfig(n_embd=D, n_head=1, n_layer=1, n_expert=E, top_k=K, ffn_hidden=16, router=router,
                           balance=balance, bias_update_rate=0.003, expert_impl='grouped')
        moe = MoE(config)
        x = torch.randn(1, 512, D)
        mean = x.view(-1, D).mean(0)
        with torch.no_grad():
            moe.router.w_g.weight[[0, 4]] += 2 * mean / mean.square().sum()  # +2 on two experts' logits
            target = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, D))(x)
        cv = [(s['load'].std(correction=0) / s['load'].mean()).item()
              for s in regression_steps(moe, x, target, steps)]
        cvs[balance] = torch.tensor(cv).view(-1, 20).mean(1)  # [steps / 20]
    bias, none = cvs['bias'], cvs['none']
    assert bias[0] > 0.6 and none[0] > 0.6  # skewed at the start
    assert (bias[1:] <= bias[:-1] + 0.02).all(), bias  # never up by more than noise
    assert bias[-1] < 0.4 * bias[0], bias
    assert (none > 0.6).all(), none


def test_bias_survives_checkpoints_casts_and_eval():
    config = GPTConfig(n_layer=2, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=1, block_size=8,
                       vocab_size=32, balance='bias')
    model = GPT(config)
    load = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    for _ in range(3):
        model.update_routers(load)
    bias = torch.stack([r.bias for r in model.routers()]).clone()
    # one overloaded expert steps down by u, the others up by u; then centred: -0.75u*... exactly:
    u = config.bias_update_rate
    torch.testing.assert_close(bias[0], 3 * torch.tensor([-u, u, u, u]) - 3 * u / 2)
    assert bias.sum(-1).abs().max() < 1e-9  # zero-mean
    idx = torch.randint(0, 32, (2, 8))
    model.eval()
    sample.generate(model, idx[:, :2], 3)
    model.train()
    model(idx, idx)[1].backward()
    assert torch.equal(torch.stack([r.bias for r in model.routers()]), bias)  # only update_routers moves it
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = GPT(config)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.to(torch.bfloat16)
    assert all(r.bias.dtype == torch.float32 for r in fresh.routers())
    assert torch.equal(torch.stack([r.bias for r in fresh.routers()]), bias)
    assert fresh.lm_head.weight.dtype == torch.bfloat16


def test_bias_and_shared_experts_resume_exactly(tmp_path, data_dir):
    """6 iterations in one go equal 3 + resume + 3, the logged bias included."""
    common = ['--balance=bias', '--bias_update_rate=0.01', '--n_shared_expert=1', '--log_interval=1',
              '--eval_interval=3', '--warmup_iters=1', '--lr_decay_iters=6']
    train(tmp_path, data_dir, *common, '--max_iters=6', f'--out_dir={tmp_path}/straight')
    train(tmp_path, data_dir, *common, '--max_iters=3', f'--out_dir={tmp_path}/resumed')
    train(tmp_path, data_dir, *common, '--max_iters=6', '--init_from=resume', f'--out_dir={tmp_path}/resumed')
    logs = [{r['iter']: r for r in read_log(tmp_path / d) if 'loss' in r} for d in ('straight', 'resumed')]
    assert sorted(logs[1]) == list(range(6))
    for it in range(6):
        assert logs[1][it]['loss'] == pytest.approx(logs[0][it]['loss'], rel=1e-5), it
        assert logs[1][it]['bias'] == logs[0][it]['bias'], it
    assert logs[0][0]['bias_spread'] == [0.0, 0.0] and logs[0][5]['bias_spread'][0] > 0


# -----------------------------------------------------------------------------
# shared experts


def test_shared_experts_are_the_sum_of_separate_swiglus():
    """One MLP of hidden S*H is S experts of hidden H side by side: the sum of their outputs."""
    torch.manual_seed(0)
    S, D, H = 3, 8, 5
    shared = MLP(D, S * H)
    x = torch.randn(4, D)
    w_in, w_out = shared.c_fc.weight, shared.c_proj.weight  # [2SH, D], [D, SH]
    total = sum(swiglu(torch.cat([x @ w_in[s * H:(s + 1) * H].t(), x @ w_in[S * H + s * H:S * H + (s + 1) * H].t()],
                                 -1)) @ w_out[:, s * H:(s + 1) * H].t() for s in range(S))
    torch.testing.assert_close(shared(x), total)


@pytest.mark.parametrize('router', ['topk', 'remoe', 'prototype'])
@pytest.mark.parametrize('impl', ['grouped', 'triton'])
def test_shared_experts_keep_every_backend_equal_to_loop(router, impl):
    torch.manual_seed(0)
    config = GPTConfig(n_embd=8, n_head=1, n_layer=1, n_expert=4, top_k=2, ffn_hidden=6, router=router,
                       n_shared_expert=2, expert_impl='loop')
    ref = MoE(config)
    if router == 'remoe':
        with torch.no_grad():  # tokens far along v get every logit negative: no routed expert
            v = torch.randn(8)
            ref.router.w_g.weight.copy_(-v + 0.1 * torch.randn(4, 8))
    fast = MoE(config)
    fast.load_state_dict(ref.state_dict())
    fast.experts.impl = impl
    x = torch.randn(2, 8, 8)
    outs = []
    for moe in (ref, fast):
        xi = x.clone().requires_grad_()
        y, aux_loss, _, _ = moe(xi, None)
        (y.square().sum() + aux_loss).backward()
        outs.append((y, xi.grad, *(p.grad for p in moe.parameters())))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if router == 'remoe':  # a token with every routed gate zero gets the shared output, exactly
        gates = ref.router(x.view(16, 8))[0]
        idle = (gates == 0).all(-1)
        assert idle.any()
        torch.testing.assert_close(outs[0][0].view(16, 8)[idle], ref.shared(x.view(16, 8)[idle]))


@pytest.mark.parametrize('G', [1, 2])
def test_shared_expert_parameter_counts(G):
    """E=7 routed (1 active) + 1 shared has the total parameters of E=8, K=2 and the active FFN of
    the dense model with ffn_hidden = 2H; only the router's one row per layer differs. Granularity G
    makes every expert, shared ones too, G times narrower."""
    base = dict(n_layer=2, n_head=2, n_embd=16, ffn_hidden=32, vocab_size=64, block_size=8, expert_granularity=G)
    D, L = 16, 2
    topk = GPT(GPTConfig(n_expert=8, top_k=2, **base))
    shared = GPT(GPTConfig(n_expert=7, top_k=1, n_shared_expert=G, **base))
    dense = GPT(GPTConfig(moe_every=0, **{**base, 'ffn_hidden': 64, 'expert_granularity': 1}))
    router_rows = lambda E: L * E * G * D
    assert shared.num_params() == topk.num_params() - router_rows(8) + router_rows(7)
    assert shared.num_params(active=True) == dense.num_params(active=True) + router_rows(7)
    assert topk.num_params(active=True) == dense.num_params(active=True) + router_rows(8)
    assert shared.flops_per_token() - dense.flops_per_token() == 6 * router_rows(7)
