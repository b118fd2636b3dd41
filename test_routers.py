"""
Property-based tests of the routers (hypothesis): sparsity, gate values, differentiability,
and the balancing losses against their closed forms.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experts import moe_ffn, swiglu
from model import GPTConfig
from routers import TopKRouter, make_router, routing_stats, switch_balance_loss, z_loss

settings.register_profile('repo', max_examples=30, deadline=None)
settings.load_profile('repo')


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
    stats = routing_stats(probs, torch.zeros(5, 8).scatter(1, torch.zeros(5, 1, dtype=torch.long), 1.0))
    assert stats['entropy'].item() == pytest.approx(math.log(8), rel=1e-5)
    assert stats['load'].tolist() == [1.0] + [0.0] * 7
