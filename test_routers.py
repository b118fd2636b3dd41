"""
Property-based tests of the routers (hypothesis): sparsity, gate values, differentiability,
and the balancing losses against their closed forms.
"""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from experts import moe_ffn
from pairs import swiglu
from model import GPT, GPTConfig
from routers import make_router, routing_stats
from softmax_routers import TopKRouter, switch_balance_loss, z_loss

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


@pytest.mark.parametrize('recurrent', [False, True])
def test_router_logits_are_fp32_under_bf16_autocast(recurrent):
    """Under bf16 autocast the router still computes in fp32: the very logits of no autocast."""
    torch.manual_seed(0)
    config = GPTConfig(n_embd=16, n_head=1, n_layer=1, n_expert=8, top_k=2, recurrent_router=recurrent, rmoe_dim=8)
    gru = nn.GRUCell(8, 8) if recurrent else None
    router, x = make_router(config, gru), torch.randn(32, 16)
    want, want_state = router.logits(x, None)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, got_state = router.logits(x.bfloat16(), None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, router.logits(x.bfloat16().float(), None)[0], rtol=0, atol=0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16 = router.w_g(x if gru is None else want_state).float()
    assert not torch.equal(want, bf16)  # what an autocast (bf16) matmul would have made


def test_routing_stats_entropy_of_a_uniform_router_is_log_E():
    probs = torch.full((5, 8), 1 / 8)
    stats = routing_stats(torch.zeros(5, 8).scatter(1, torch.zeros(5, 1, dtype=torch.long), 1.0), probs)
    assert stats['entropy'].item() == pytest.approx(math.log(8), rel=1e-5)
    assert stats['load'].tolist() == [1.0] + [0.0] * 7


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


@pytest.mark.parametrize('router, capacity, needles', [
    ('remoe', 0.0, ['sparsity 0.700 (target 0.750)', 'λ 1.00e-08', 'load cv 0.15']),
    ('topk', 0.0, ['load cv 0.15']),
    ('topk', 1.25, ['load cv 0.15', 'dropped 3.0%']),
    ('prototype', 1.0, ['load cv 0.15', 'dropped 3.0%']),
])
def test_console_line_shows_what_to_watch_for_each_router(router, capacity, needles):
    """The training loop prints router.console(record) after tokens/s: ReMoE's controller, or the load."""
    config = GPTConfig(n_embd=8, n_head=1, router=router, capacity_factor=capacity)
    record = {'sparsity': 0.7, 'sparsity_per_layer': [0.6, 0.8], 'lambda': 1e-8, 'load_cv': [0.1, 0.2], 'dropped': [0.02, 0.04]}
    line = make_router(config).console(record)
    assert all(needle in line for needle in needles), line
    assert ('dropped' in line) == (capacity > 0) and ('λ' in line) == (router == 'remoe')
