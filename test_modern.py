"""
The routers people train today (ROUTERS.md §5): DeepSeek-V3's sigmoid scoring with renormalised,
scaled gates and its bias balancing, its sequence-wise balance loss, and Default MoE's dense router
gradient (an EMA of each expert's output standing in for the experts a token did not choose).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from model import GPTConfig, MoE
from routers import make_router, switch_balance_loss


def sigmoid_router(E, K, D, seed, recurrent=False, **extra):
    torch.manual_seed(seed)
    config = GPTConfig(n_embd=D, n_head=1, n_layer=1, n_expert=E, top_k=K, score='sigmoid', router_renorm=True,
                       recurrent_router=recurrent, rmoe_dim=4, **extra)
    return make_router(config, torch.nn.GRUCell(4, 4) if recurrent else None)

# -----------------------------------------------------------------------------
# sigmoid scoring (DeepSeek-V3 eq. 15-16 and 13)


@given(N=st.integers(1, 24), K=st.integers(1, 4), seed=st.integers(0, 2**16), route_scale=st.floats(0.1, 4),
       bias_scale=st.floats(0, 10), recurrent=st.booleans())
def test_sigmoid_gates_are_renormalised_scaled_and_the_bias_only_chooses(N, K, seed, route_scale, bias_scale,
                                                                           recurrent):
    """Gates: non-negative, K per token, summing to route_scale; each the chosen expert's sigmoid
    score over the chosen scores' sum, times route_scale, whatever the bias. The bias decides only
    which K: the top-k of sigmoid score + bias. Logits from a linear map or RMoE's GRU alike."""
    E, D = 8, 6
    router = sigmoid_router(E, K, D, seed, recurrent, balance='bias', route_scale=route_scale)
    gen = torch.Generator().manual_seed(seed)
    router.bias.copy_(bias_scale * torch.randn(E, generator=gen))
    x = torch.randn(N, D, generator=gen)
    gates, aux_loss, stats, _ = router(x)
    s = router.logits(x, None)[0].sigmoid()  # [N, E], the GRU's logits under recurrent_router
    chosen = torch.zeros(N, E, dtype=torch.bool).scatter(1, (s + router.bias).topk(K, -1).indices, True)
    assert torch.equal(gates > 0, chosen) and (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.full((N,), route_scale))
    expected = route_scale * s / (s * chosen).sum(-1, keepdim=True)  # the bias is nowhere in the values
    torch.testing.assert_close(gates[chosen], expected[chosen])
    assert aux_loss.item() == 0  # balance='bias' and no sequence-wise loss: no loss at all
    # the gate values, not the bias, carry the router's gradient (with K = 1 they are constant)
    if K > 1:
        (gates * torch.randn(N, E, generator=gen)).sum().backward()
        assert router.w_g.weight.grad.abs().sum() > 0 and router.bias.grad is None


def test_sigmoid_stats_and_switch_loss_see_normalised_scores():
    """The entropy and the Switch loss read s' = s / sum_j s (DeepSeek-V3 eq. 19), a distribution,
    so the Switch loss keeps its value 1 for a uniform router."""
    router = sigmoid_router(8, 2, 6, 0, balance='aux', aux_loss_coef=1.0)
    with torch.no_grad():
        router.w_g.weight.zero_()  # every score sigmoid(0) = 0.5: s' = 1/8 for every expert
    x = torch.randn(64, 6)
    _, aux_loss, stats, _ = router(x)
    torch.testing.assert_close(stats['entropy'], torch.log(torch.tensor(8.0)))
    assert aux_loss.item() == pytest.approx(8 * sum(f * 1 / 8 for f in stats['load'] / 2), rel=1e-6)


@pytest.mark.parametrize('router', ['topk', 'prototype'])
def test_softmax_with_route_scale_scales_the_gates_and_nothing_else(router):
    torch.manual_seed(0)
    config = dict(n_embd=6, n_head=1, n_layer=1, n_expert=8, top_k=2, router=router)
    plain = make_router(GPTConfig(**config))
    scaled = make_router(GPTConfig(route_scale=2.5, **config))
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(10, 6)
    (g1, a1, _, _), (g2, a2, _, _) = plain(x), scaled(x)
    torch.testing.assert_close(g2, 2.5 * g1)
    torch.testing.assert_close(a2, a1)  # the Switch loss counts choices and reads probabilities


@pytest.mark.parametrize('bad, needle', [
    (dict(score='cosine'), "score='cosine' is not one of softmax, sigmoid"),
    (dict(router='remoe', score='sigmoid'), "score='sigmoid' with router='remoe' is invalid"),
    (dict(route_scale=0.0), 'route_scale=0.0 must be > 0'),
    (dict(seq_aux_coef=-1e-4), 'seq_aux_coef=-0.0001 must be >= 0'),
])
def test_bad_modern_router_values_are_one_line_errors(bad, needle):
    with pytest.raises(ValueError, match=needle.replace('(', r'\(')) as e:
        GPTConfig(**bad).validate()
    assert '\n' not in str(e.value)

# -----------------------------------------------------------------------------
# the sequence-wise balance loss (DeepSeek-V3 eq. 17-20)


def seq_loss_by_hand(s, chosen, K, T):
    """eq. 17-20 with loops: for each sequence, f_i = E/(K T) sum_t 1[i chosen for t], s' = s / sum_j s,
    P_i = (1/T) sum_t s'_{i,t}, L = sum_i f_i P_i; the mean over the sequences."""
    (N, E), s = s.shape, s.detach()
    losses = []
    for b in range(N // T):
        rows = range(b * T, (b + 1) * T)
        f = [E / (K * T) * sum(float(chosen[t, i]) for t in rows) for i in range(E)]
        P = [sum(float(s[t, i] / s[t].sum()) for t in rows) / T for i in range(E)]
        losses.append(sum(fi * pi for fi, pi in zip(f, P)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize('score', ['softmax', 'sigmoid'])
@given(B=st.integers(1, 4), T=st.integers(1, 8), K=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_sequence_wise_loss_is_the_closed_form(score, B, T, K, seed):
    E, D, alpha = 8, 6, 1e-2
    torch.manual_seed(seed)
    router = make_router(GPTConfig(n_embd=D, n_head=1, n_expert=E, top_k=K, score=score, balance='none',
                                   seq_aux_coef=alpha))
    x = torch.randn(B * T, D)
    gates, aux_loss, _, _ = router(x, seq_len=T)
    logits = router.logits(x, None)[0]
    s = logits.sigmoid() if score == 'sigmoid' else logits.softmax(-1)
    assert aux_loss.item() == pytest.approx(alpha * seq_loss_by_hand(s, gates > 0, K, T), rel=1e-5)
    # a gradient reaches the router through P (f is a count)
    aux_loss.backward()
    assert router.w_g.weight.grad.abs().sum() > 0


@given(T_over=st.integers(1, 4), E_over_K=st.sampled_from([1, 2, 4]), K=st.integers(1, 3), B=st.integers(1, 3))
def test_sequence_wise_loss_is_one_under_uniform_routing(T_over, E_over_K, K, B):
    """Every expert chosen K T / E times in each sequence and every s' = 1/E: f_i = 1, P_i = 1/E,
    so L = α sum_i 1/E = α. (With P = f / E, i.e. choices that follow the scores, L = α E sum_i P_i^2
    >= α, equality only there: uniform routing is where it is smallest.)"""
    E = K * E_over_K
    T = E_over_K * T_over  # tokens t choose experts tK .. tK + K - 1 (mod E): a round robin
    chosen = torch.zeros(B * T, E)
    for t in range(B * T):
        chosen[t, [(t * K + j) % E for j in range(K)]] = 1.0
    probs = torch.full((B * T, E), 1 / E)
    assert switch_balance_loss(probs, chosen, K, seq_len=T).item() == pytest.approx(1.0)


def test_moe_layer_passes_its_sequence_length():
    """The MoE block hands the router T: its loss over a batch of B sequences is the mean of the B
    single-sequence losses, not the loss of one long sequence."""
    torch.manual_seed(0)
    moe = MoE(GPTConfig(n_embd=8, n_head=1, n_layer=1, n_expert=4, top_k=2, ffn_hidden=8, balance='none',
                        seq_aux_coef=1.0, expert_impl='grouped'))
    x = torch.randn(3, 5, 8)
    whole = moe(x, None)[1]
    single = torch.stack([moe(x[b:b + 1], None)[1] for b in range(3)])
    torch.testing.assert_close(whole, single.mean())
    assert not torch.allclose(whole, moe(x.view(1, 15, 8), None)[1])
