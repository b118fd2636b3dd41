"""
Property-based tests of the routers (hypothesis): sparsity, gate values, differentiability,
and the balancing losses against their closed forms.
"""

import io
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st

from experts import moe_ffn, swiglu
from model import GPT, MoE, GPTConfig
from routers import TopKRouter, make_router, remoe_l1, routing_stats, switch_balance_loss, z_loss

@st.composite
def topk_setups(draw):
    E = draw(st.integers(1, 16))
    return dict(N=draw(st.integers(1, 24)), D=draw(st.integers(1, 12)), E=E, k=draw(st.integers(1, E)),
                renorm=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def build_topk(N, D, E, k, renorm, seed, aux_loss_coef=0.01):
    torch.manual_seed(seed)
    config = GPTConfig(n_embd=D, n_head=1, n_expert=E, top_k=k, router_renorm=renorm,
                       aux_loss_coef=aux_loss_coef)
    router = make_router(config)
    return router, torch.randn(N, D)


@given(topk_setups())
def test_topk_has_exactly_k_nonnegative_gates_per_row(s):
    router, x = build_topk(**s)
    gates, aux_loss, stats, _ = router(x)
    assert gates.shape == (s['N'], s['E'])
    assert ((gates > 0).sum(-1) == s['k']).all()
    assert (gates >= 0).all()
    assert torch.isfinite(aux_loss) and aux_loss >= 0
    assert torch.allclose(stats['active'], torch.tensor(float(s['k'])))
    assert torch.allclose(stats['load'].sum(), torch.tensor(float(s['k'])), atol=1e-5)


@given(topk_setups())
def test_topk_gates_are_the_largest_probabilities(s):
    router, x = build_topk(**s)
    gates, _, _, _ = router(x)
    probs = router.w_g(x).softmax(-1)
    chosen = gates > 0
    kept = torch.where(chosen, probs, torch.inf).min(-1).values
    dropped = torch.where(chosen, -torch.inf, probs).max(-1).values
    assert (kept >= dropped).all()  # no unselected expert beats a selected one
    if s['renorm']:
        assert torch.allclose(gates.sum(-1), torch.ones(s['N']), atol=1e-5)
    else:  # gates are the softmax probabilities themselves
        assert torch.allclose(gates[chosen], probs[chosen])


@given(topk_setups(), st.integers(1, 8))
def test_topk_router_gradient_flows_only_through_selected_experts(s, H):
    """dL/dlogits must equal the softmax Jacobian applied to g, where g[n, e] = <dy_n, FFN_e(x_n)>
    on the selected experts and 0 elsewhere: unselected experts contribute nothing."""
    router, x = build_topk(**s, aux_loss_coef=0.0)
    w_in, w_out = torch.randn(s['E'], s['D'], 2 * H), torch.randn(s['E'], H, s['D'])
    gates, _, _, _ = router(x)
    y = moe_ffn(x, gates, w_in, w_out, 'loop')
    dy = torch.randn_like(y)
    (grad_w,) = torch.autograd.grad(y, router.w_g.weight, dy)

    logits = router.w_g(x).detach()
    p = logits.softmax(-1)
    ffn = torch.stack([swiglu(x @ w_in[e]) @ w_out[e] for e in range(s['E'])], 1)  # [N, E, D]
    g = torch.einsum('nd,ned->ne', dy, ffn) * (gates > 0)  # dL/dgates, zero off the selected experts
    if s['renorm']:  # gates = p / sum_selected(p): chain rule through the normalisation
        mask = (gates > 0).float()
        sel = (p * mask).sum(-1, keepdim=True)
        g = mask * (g / sel - (g * p * mask).sum(-1, keepdim=True) / sel**2)
    dlogits = p * (g - (p * g).sum(-1, keepdim=True))  # softmax Jacobian
    expected = dlogits.t() @ x  # [E, D]
    assert torch.allclose(grad_w, expected, atol=1e-4, rtol=1e-4)
    if s['k'] < s['E'] and not s['renorm']:
        assert grad_w.abs().sum() > 0  # the router learns from the language-model loss


def test_topk_with_k1_and_renorm_gets_no_lm_gradient():
    """Why renormalisation is off by default: a single renormalised gate is always 1."""
    w_in, w_out = torch.randn(4, 6, 8), torch.randn(4, 4, 6)
    grads = {}
    for renorm in (False, True):
        router, x = build_topk(N=8, D=6, E=4, k=1, renorm=renorm, seed=0, aux_loss_coef=0.0)
        gates, _, _, _ = router(x)
        y = moe_ffn(x, gates, w_in, w_out, 'loop')
        (grads[renorm],) = torch.autograd.grad(y.square().sum(), router.w_g.weight)
    assert torch.equal(gates.sum(-1), torch.ones(8))
    assert grads[True].abs().max() < 1e-5 * grads[False].abs().max()  # rounding noise only


# -----------------------------------------------------------------------------
# balancing losses against closed forms


@given(st.integers(1, 16), st.integers(1, 64), st.data())
def test_switch_loss_is_one_under_uniform_routing(E, reps, data):
    """Every expert receives the same number of assignments and the router is uniform: loss = 1."""
    k = data.draw(st.integers(1, E))
    N = E * reps
    probs = torch.full((N, E), 1.0 / E)
    gates = torch.zeros(N, E)
    for n in range(N):  # token n uses experts n, n+1, ..., n+k-1 (mod E): a perfectly even load
        gates[n, [(n + j) % E for j in range(k)]] = 1.0 / E
    assert math.isclose(switch_balance_loss(probs, gates, k).item(), 1.0, rel_tol=1e-5)


@given(st.integers(1, 16), st.integers(1, 32), st.integers(0, 2**16))
def test_switch_loss_matches_its_closed_form(E, N, seed):
    torch.manual_seed(seed)
    k = int(torch.randint(1, E + 1, ()))
    probs = torch.randn(N, E).softmax(-1)
    gates = torch.zeros(N, E).scatter(1, probs.topk(k).indices, 1.0)
    expected = sum(E * (gates[:, e].sum() / (N * k)) * probs[:, e].mean() for e in range(E))
    assert math.isclose(switch_balance_loss(probs, gates, k).item(), float(expected), rel_tol=1e-5, abs_tol=1e-7)


def test_switch_loss_collapsed_routing_is_E():
    E, N = 8, 10
    probs = torch.zeros(N, E)
    probs[:, 3] = 1.0  # every token sends all its probability and its one assignment to expert 3
    assert switch_balance_loss(probs, probs.clone(), 1).item() == pytest.approx(E)


def test_switch_loss_gradient_flows_through_probabilities_only():
    probs = torch.randn(6, 4).softmax(-1).requires_grad_()
    gates = torch.zeros(6, 4).scatter(1, probs.topk(2).indices, 1.0)
    (g,) = torch.autograd.grad(switch_balance_loss(probs, gates, 2), probs)
    f = gates.sum(0) / (6 * 2)
    assert torch.allclose(g, (4 * f / 6).expand(6, 4))  # d/dP_e of E * sum f_e P_e, P = mean over N


def test_z_loss_closed_form():
    assert z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).item() ** 2)


def test_z_loss_is_added_with_its_coefficient():
    torch.manual_seed(0)
    x = torch.randn(7, 6)
    config = GPTConfig(n_embd=6, n_head=1, n_expert=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=1e-3)
    router = TopKRouter(config)
    _, aux_loss, _, _ = router(x)
    assert aux_loss.item() == pytest.approx(1e-3 * z_loss(router.w_g(x)).item(), rel=1e-5)


def test_routing_stats_entropy_of_a_uniform_router_is_log_E():
    probs = torch.full((5, 8), 1 / 8)
    stats = routing_stats(torch.zeros(5, 8).scatter(1, torch.zeros(5, 1, dtype=torch.long), 1.0), probs)
    assert stats['entropy'].item() == pytest.approx(math.log(8), rel=1e-5)
    assert stats['load'].tolist() == [1.0] + [0.0] * 7


# -----------------------------------------------------------------------------
# ReMoE: ReLU routing with the adaptive, load-balanced L1 penalty


def remoe_layer(N=6, D=5, E=4, K=1, H=3, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(n_embd=D, n_head=1, n_layer=1, ffn_hidden=H, n_expert=E, top_k=K, router='remoe', **kw)
    return MoE(config).to(dtype), torch.randn(1, N, D, dtype=dtype)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**16))
def test_remoe_passes_gradcheck_away_from_the_kink(N, D, E, seed):
    moe, x = remoe_layer(N, D, E, 1, 3, seed, torch.float64, expert_impl="loop")  # grouped_mm has no fp64
    moe.router.lam.fill_(0.3)  # include the L1 term
    assume((x[0] @ moe.router.w_g.weight.t()).abs().min() > 1e-3)  # no logit at ReLU's kink
    params = (x.requires_grad_(), moe.router.w_g.weight, moe.experts.w_in, moe.experts.w_out)

    def f(x, w_g, w_in, w_out):
        y, aux_loss, _, _ = torch.func.functional_call(
            moe, {'router.w_g.weight': w_g, 'experts.w_in': w_in, 'experts.w_out': w_out}, (x, None))
        return y, aux_loss

    assert torch.autograd.gradcheck(f, params, eps=1e-7, atol=1e-6)


def test_remoe_output_is_continuous_where_topk_jumps():
    """Two experts whose logits are nearly tied swap under a tiny change of the router weights:
    the top-1 output jumps from one expert to the other, the ReLU output moves by O(change)."""
    outs = {}
    for router in ('topk', 'remoe'):
        torch.manual_seed(0)
        config = GPTConfig(n_embd=4, n_head=1, n_layer=1, ffn_hidden=8, n_expert=4, top_k=1, router=router)
        moe = MoE(config)
        x = torch.tensor([[[1.0, 0.5, -0.3, 0.8]]])
        u = x[0, 0] / x[0, 0].square().sum()  # (x . u) = 1: a weight row c*u gives the logit c
        with torch.no_grad():
            moe.experts.w_in.normal_()  # experts of unit scale, so their outputs clearly differ
            moe.experts.w_out.normal_()
            w = moe.router.w_g.weight  # [E, D]
            w.copy_(torch.stack([1.0 * u, 1.0001 * u, -u, -u]))  # expert 1 leads expert 0 by 1e-4
            y0 = moe(x, None)[0]
            w[0] += 2e-4 * u  # now expert 0 leads by 1e-4
            y1 = moe(x, None)[0]
        outs[router] = (y1 - y0).norm().item()
    assert outs['remoe'] < 1e-3 and outs['topk'] > 1e-2  # O(1e-4) against O(1)


@given(st.integers(1, 24), st.integers(1, 8), st.integers(0, 2**16))
def test_remoe_every_active_expert_gets_gradient_and_inactive_ones_none(N, E, seed):
    moe, x = remoe_layer(N, 6, E, 1, 4, seed)
    y, _, _, _ = moe(x, None)
    gates = torch.relu(x[0] @ moe.router.w_g.weight.t())
    g_in, g_out = torch.autograd.grad(y, (moe.experts.w_in, moe.experts.w_out), torch.randn_like(y))
    used = (gates > 0).any(0)  # [E]
    for e in range(E):
        if used[e]:
            assert g_in[e].abs().sum() > 0 and g_out[e].abs().sum() > 0
        else:
            assert g_in[e].abs().sum() == 0 and g_out[e].abs().sum() == 0


@pytest.mark.parametrize('impl', ['loop', 'grouped'])
def test_remoe_inactive_tokens_get_exactly_zero_and_an_all_zero_layer_runs(impl):
    moe, x = remoe_layer(N=10, D=4, E=4, K=1, expert_impl=impl)
    with torch.no_grad():
        moe.router.w_g.weight.fill_(-1.0)
    x = x.abs().requires_grad_()  # every logit negative: no token has an expert
    y, aux_loss, stats, _ = moe(x, None)
    assert torch.equal(y, torch.zeros_like(y)) and aux_loss.item() == 0 and stats['sparsity'].item() == 1
    (y.sum() + aux_loss).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_remoe_l1_closed_form_and_constant_load():
    gates = torch.tensor([[0.5, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    N, E, K = 3, 4, 1
    f = torch.tensor([1.0, 0.0, 1.0, 2.0]) * E / (K * N)  # tokens per expert, relative to K*N/E
    expected = (f * gates).sum() / N
    loss = remoe_l1(gates, K)
    assert loss.item() == pytest.approx(expected.item())
    (grad,) = torch.autograd.grad(loss, gates)
    # f is a constant: the gradient is f_e / N on every entry, and the ReLU zeroes it off the active ones
    assert torch.allclose(grad, (f / N).expand(N, E))
    assert remoe_l1(torch.zeros(5, 4), 1).item() == 0  # its minimum: why λ cannot be fixed


def test_remoe_l1_is_the_gate_mass_under_uniform_routing():
    N, E, K = 8, 4, 2
    gates = torch.zeros(N, E)
    for n in range(N):  # every expert serves exactly K*N/E tokens: f_e = 1
        gates[n, [(2 * n) % E, (2 * n + 1) % E]] = 0.7
    assert remoe_l1(gates, K).item() == pytest.approx(gates.sum().item() / N)


def test_remoe_controller_reaches_and_holds_the_target_sparsity():
    """A toy regression through one ReMoE layer, λ from the paper's defaults (λ0 = 1e-8, α = 1.2).
    The inputs share a mean direction, as a transformer's hidden states do (with zero-mean inputs
    no linear router without bias can be sparser than 1/2)."""
    E, K, D, steps = 8, 1, 16, 300
    moe, _ = remoe_layer(E=E, K=K, D=D, H=16, seed=0)
    torch.manual_seed(0)
    x = torch.randn(1, 256, D) + 2 * torch.randn(D)
    teacher = nn.Sequential(nn.Linear(D, 64), nn.Tanh(), nn.Linear(64, D))
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    sparsity, lam = [], [moe.router.lam.item()]
    for _ in range(steps):
        y, aux_loss, stats, _ = moe(x, None)
        ((y - target).square().mean() + aux_loss).backward()
        opt.step()
        opt.zero_grad()
        moe.router.update(stats['sparsity'])
        sparsity.append(stats['sparsity'].item())
        lam.append(moe.router.lam.item())
    goal = 1 - K / E
    settled = next(i for i, s in enumerate(sparsity) if abs(s - goal) <= 0.02)
    assert 50 < settled < 150  # λ must first grow ~1e6-fold at ×1.2 a step: about 80 steps
    tail = torch.tensor(sparsity[-100:])
    assert abs(tail.mean().item() - goal) <= 0.02
    assert ((tail - goal).abs() <= 0.02).float().mean() >= 0.75
    for before, after, s in zip(lam, lam[1:], sparsity):  # exactly ×α when too dense, ÷α otherwise
        assert after == pytest.approx(before * (1.2 if s < goal else 1 / 1.2), rel=1e-6)


@pytest.mark.parametrize('floor', [True, False])
def test_remoe_controller_recovers_from_above(floor):
    """The toy above, started too sparse (every logit pushed down: sparsity 0.99, three experts dead
    on every token) after λ was divided for 600 steps, as in a run that stayed above its target.
    With the floor λ rests at λ0 and the sparsity is back in its band within 150 steps and stays;
    without it λ sits in float32's denormals, cannot grow, and the sparsity overshoots far below."""
    E, K, D, steps = 8, 1, 16, 400
    moe, _ = remoe_layer(E=E, K=K, D=D, H=16, seed=0, remoe_lambda_floor=floor)
    torch.manual_seed(0)
    mean = 2 * torch.randn(D)
    x = torch.randn(1, 256, D) + mean
    teacher = nn.Sequential(nn.Linear(D, 64), nn.Tanh(), nn.Linear(64, D))
    with torch.no_grad():
        target = teacher(x)
        moe.router.w_g.weight -= 2 * mean / mean.square().sum()  # every logit lowered by 2
        for _ in range(600):
            moe.router.update(torch.tensor(0.99))
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    sparsity, alive = [], []
    for _ in range(steps):
        y, aux_loss, stats, _ = moe(x, None)
        alive.append(int((stats['load'] > 0).sum()))
        ((y - target).square().mean() + aux_loss).backward()
        opt.step()
        opt.zero_grad()
        moe.router.update(stats['sparsity'])
        sparsity.append(stats['sparsity'].item())
    goal = 1 - K / E
    assert sparsity[0] > 0.95 and alive[0] == E - 3
    tail = torch.tensor(sparsity[-200:])
    if floor:  # each step's sparsity swings by ~±0.05 (Adam at 3e-3); its 20-step mean holds the band
        smooth = torch.tensor(sparsity).unfold(0, 20, 1).mean(1)  # [steps - 19]
        outside = ((smooth - goal).abs() > 0.02).nonzero()
        assert outside.max().item() + 20 < 150  # in the band for good within 150 steps
        assert alive[-1] == alive[0]  # an expert off for every token gets no gradient: it stays dead
    else:
        assert moe.router.lam.item() < 1e-44 and tail.max().item() < goal - 0.3


def test_remoe_lambda_survives_checkpoints_casts_and_eval():
    config = GPTConfig(n_layer=2, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=1, router='remoe',
                       block_size=8, vocab_size=32, remoe_lambda0=1e-8)
    model = GPT(config)
    for _ in range(7):
        model.update_routers(torch.tensor(0.1))  # too dense: λ grows
    lam = model.router_lambda()
    assert lam == pytest.approx(1e-8 * 1.2**7, rel=1e-6)
    idx = torch.randint(0, 32, (2, 8))
    model.eval()
    model(idx, idx)
    model.generate(idx[:, :2], 3)
    model.train()
    model(idx, idx)
    assert model.router_lambda() == lam  # only update_routers moves λ
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = GPT(config)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.router_lambda() == lam
    fresh.to(torch.bfloat16)
    lams = [b.mlp.router.lam for b in fresh.transformer.h]
    assert all(t.dtype == torch.float32 and t.item() == lam for t in lams)
    assert fresh.lm_head.weight.dtype == torch.bfloat16


def test_remoe_lambda_floor_keeps_the_controller_able_to_climb():
    """Too sparse for many steps: without the floor λ ends in float32's denormals, where x1.2
    rounds back to the same number and λ can never grow again; with it, λ rests at λ0."""
    for floor, rest in ((True, 1e-8), (False, 2.8e-45)):
        config = GPTConfig(n_layer=1, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=1, router='remoe',
                           block_size=8, vocab_size=32, remoe_lambda0=1e-8, remoe_lambda_floor=floor)
        model = GPT(config)
        for _ in range(600):
            model.update_routers(torch.tensor(0.99))  # far sparser than the target 0.75
        assert model.router_lambda() == pytest.approx(rest, rel=0.01)
        model.update_routers(torch.tensor(0.1))  # now too dense: λ should grow
        grown = model.router_lambda()
        assert grown == (pytest.approx(1.2e-8, rel=1e-6) if floor else pytest.approx(2.8e-45, rel=0.01))


@pytest.mark.parametrize('router', ['topk', 'remoe', 'prototype'])
def test_layer_reduction_mean_is_sum_over_the_number_of_moe_layers(router):
    """aux_loss_reduction (Switch, z-loss) and remoe_l1_reduction: 'mean' is exactly 'sum' / L."""
    losses = {}
    for reduction in ('sum', 'mean'):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=3, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=2, router=router,
                           block_size=8, vocab_size=32, z_loss_coef=1e-3 if router != 'remoe' else 0.0,
                           remoe_lambda0=1e-2, aux_loss_reduction=reduction, remoe_l1_reduction=reduction)
        _, _, info = GPT(config)(*(2 * [torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))]))
        losses[reduction] = info['aux_loss'].item()
    assert losses['sum'] > 0 and losses['mean'] == pytest.approx(losses['sum'] / 3, rel=1e-5)
    assert GPTConfig().aux_loss_reduction == 'sum' and GPTConfig().remoe_l1_reduction == 'mean'  # as documented
    with pytest.raises(ValueError, match="aux_loss_reduction='avg' is not 'sum' or 'mean'"):
        GPTConfig(aux_loss_reduction='avg').validate()


# -----------------------------------------------------------------------------
# expert prototyping


@st.composite
def prototype_setups(draw):
    K = draw(st.integers(1, 4))
    return dict(N=draw(st.integers(1, 24)), D=draw(st.integers(1, 8)), K=K, m=draw(st.integers(1, 4)),
                renorm=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def build_prototype(N, D, K, m, renorm, seed, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(n_embd=D, n_head=1, n_layer=1, n_expert=K * m, top_k=K, router='prototype',
                       router_renorm=renorm, **kw)
    return make_router(config), torch.randn(N, D)


@given(prototype_setups())
def test_prototype_picks_exactly_one_expert_per_group(s):
    router, x = build_prototype(**s)
    gates, _, stats, _ = router(x)
    N, K, m = s['N'], s['K'], s['m']
    groups = gates.view(N, K, m)
    assert ((groups > 0).sum(-1) == 1).all()  # one per group, so K per token
    probs = router.w_g(x).view(N, K, m).softmax(-1)
    if s['renorm']:
        assert torch.allclose(gates.sum(-1), torch.ones(N), atol=1e-5)
    else:  # each weight is its group's top-1 probability: in [1/m, 1]
        assert torch.allclose(groups.max(-1).values, probs.max(-1).values)
        assert (groups.sum(-1) >= 1 / m - 1e-6).all()


def test_prototype_with_one_group_is_switch_top1():
    torch.manual_seed(0)
    proto, x = build_prototype(N=16, D=6, K=1, m=8, renorm=False, seed=0)
    config = GPTConfig(n_embd=6, n_head=1, n_layer=1, n_expert=8, top_k=1, router='topk')
    topk = make_router(config)
    topk.load_state_dict(proto.state_dict())
    g1, a1, _, _ = proto(x)
    g2, a2, _, _ = topk(x)
    assert torch.equal(g1, g2) and a1.item() == pytest.approx(a2.item())


def test_prototype_with_k_equal_E_sums_all_experts_and_the_router_learns_nothing():
    router, x = build_prototype(N=5, D=4, K=4, m=1, renorm=False, seed=1, aux_loss_coef=0.0)
    gates, _, _, _ = router(x)
    assert torch.equal(gates, torch.ones(5, 4))
    y = moe_ffn(x, gates, torch.randn(4, 4, 6), torch.randn(4, 3, 4), 'loop')
    (grad,) = torch.autograd.grad(y.sum(), router.w_g.weight)
    assert torch.count_nonzero(grad) == 0


def test_prototype_balance_loss_is_K_under_uniform_routing_and_per_group():
    K, m, N = 3, 4, 12
    router, _ = build_prototype(N=N, D=4, K=K, m=m, renorm=False, seed=0, aux_loss_coef=1.0)
    with torch.no_grad():
        router.w_g.weight.zero_()  # uniform probabilities inside every group
    # tokens spread evenly: token n picks expert n % m in each group (ties broken by the bias below)
    x = torch.eye(4)[torch.arange(N) % m] * 10
    with torch.no_grad():
        for j in range(K):
            router.w_g.weight[j * m:(j + 1) * m] = 1e-6 * torch.eye(m, 4)
    gates, aux_loss, _, _ = router(x)
    assert ((gates > 0).sum(0) == N // m).all()
    assert aux_loss.item() == pytest.approx(K, rel=1e-4)
