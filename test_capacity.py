"""
Capacity (expert buffers and token dropping), expert granularity, and the router options that do
not combine: property tests beside test_routers.py.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from model import GPT, GPTConfig
from routers import make_router
from softmax_routers import capacity_keep
from test_routers import build_prototype


# -----------------------------------------------------------------------------
# capacity


@pytest.mark.parametrize('router', ['topk', 'prototype'])
@given(N=st.integers(1, 40), cf=st.floats(0.1, 2.0), seed=st.integers(0, 2**16))
def test_capacity_is_never_exceeded_and_a_large_factor_drops_nothing(router, N, cf, seed):
    E, K = 8, 2
    outs = {}
    for factor in (cf, float(E), 0.0):
        torch.manual_seed(seed)
        config = GPTConfig(n_embd=6, n_head=1, n_layer=1, n_expert=E, top_k=K, router=router,
                           capacity_factor=factor)
        r = make_router(config)
        x = torch.randn(N, 6) + 3 * torch.randn(6)  # a shared direction: unbalanced routing
        outs[factor] = r(x)
    gates, _, stats, _ = outs[cf]
    assert ((gates > 0).sum(0) <= math.ceil(cf * K * N / E)).all()
    assert stats['dropped'].item() == pytest.approx(1 - (gates > 0).sum().item() / (N * K))
    assert torch.equal(outs[float(E)][0], outs[0.0][0])  # capacity K*N: nothing to drop
    assert outs[float(E)][2]['dropped'].item() == 0


def test_capacity_fills_first_choices_before_second_choices():
    picks = torch.tensor([[0, 1], [0, 1], [0, 1]])  # all three tokens pick expert 0 first, expert 1 second
    keep = capacity_keep(picks, n_expert=2, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, False]]
    picks = torch.tensor([[0, 1], [1, 0], [1, 0]])  # e1 full after two first picks; e0 after two
    assert capacity_keep(picks, n_expert=2, capacity=2).tolist() == [[True, False], [True, True], [True, False]]


def test_capacity_drops_in_one_group_leave_other_groups_alone():
    N, K, m = 16, 2, 4
    router, x = build_prototype(N=N, D=6, K=K, m=m, renorm=False, seed=0, capacity_factor=1.0)
    gates, _, _, _ = router(x)
    with torch.no_grad():
        router.w_g.weight[:m] = 0
        router.w_g.weight[0] = 5 * x.mean(0)  # group 0: everything to expert 0, far over capacity
    crowded, _, stats, _ = router(x)
    assert stats['dropped'] > 0
    assert torch.equal(crowded[:, m:], gates[:, m:])


def test_capacity_is_a_training_time_rule():
    router, x = build_prototype(N=16, D=6, K=2, m=4, renorm=False, seed=0, capacity_factor=0.25)
    router.eval()
    gates, _, stats, _ = router(x)
    assert ((gates > 0).sum(-1) == 2).all() and stats['dropped'].item() == 0


# -----------------------------------------------------------------------------
# granularity and invalid combinations


@pytest.mark.parametrize('router', ['topk', 'remoe', 'prototype'])
def test_granularity_keeps_total_and_active_parameters(router):
    def build(G):
        return GPT(GPTConfig(n_layer=2, n_head=1, n_embd=8, ffn_hidden=16, n_expert=4, top_k=2, router=router,
                             expert_granularity=G, block_size=8, vocab_size=32))
    coarse, fine = build(1), build(4)
    E, K, H = fine.config.moe_shape()
    assert (E, K, H) == (16, 8, 4)
    router_params = lambda m: sum(p.numel() for n, p in m.named_parameters() if '.router.' in n)
    for active in (False, True):  # only the routers grow: one column per expert
        assert fine.num_params(active) - router_params(fine) == coarse.num_params(active) - router_params(coarse)
    if router == 'remoe':
        assert fine.transformer.h[0].mlp.router.target_sparsity == 1 - 2 / 4


@pytest.mark.parametrize('kw, needle', [
    (dict(router='remoe', capacity_factor=1.25), "capacity_factor=1.25 with router='remoe'"),
    (dict(router='remoe', router_renorm=True), "router_renorm=True with router='remoe'"),
    (dict(router='prototype', n_expert=8, top_k=3), "router='prototype' needs top_k=3"),
    (dict(expert_granularity=3, ffn_hidden=16), 'expert_granularity=3'),
    (dict(capacity_factor=-1.0), 'capacity_factor=-1.0'),
])
def test_invalid_router_options_are_one_line_errors(kw, needle):
    config = GPTConfig(n_embd=8, n_head=1, **{'n_expert': 8, 'top_k': 2, **kw})
    with pytest.raises(ValueError) as e:
        config.validate()
    assert needle in str(e.value) and '\n' not in str(e.value)
