"""
The routers people train today: DeepSeek-V3's (arXiv 2412.19437 §2.1) sigmoid scoring with
renormalised, scaled gates and its bias balancing, its sequence-wise balance loss, and Default MoE's
(arXiv 2504.12463) dense router gradient (an EMA of each expert's output standing in for the
experts a token did not choose).
"""
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sample
from conftest import read_log, train
from pairs import swiglu
from model import GPT, GPTConfig, MoE
from routers import make_router
from softmax_routers import switch_balance_loss


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
    assert aux_loss.item() == pytest.approx(8 * (stats['load'] / 2 / 8).sum().item(), rel=1e-6)  # numbers, not tensors


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

# -----------------------------------------------------------------------------
# Default MoE: a dense router gradient for top-k (dense_grad)


def default_moe(impl='grouped', seed=0, ema=True, **extra):
    """An MoE layer under dense_grad, its EMA filled with random defaults (ema=True)."""
    torch.manual_seed(seed)
    config = GPTConfig(n_embd=8, n_head=1, n_layer=1, n_expert=4, top_k=2, ffn_hidden=6, expert_impl=impl,
                       dense_grad=True, aux_loss_coef=0.0, **extra)
    moe = MoE(config)
    if ema:
        moe.router.expert_ema.copy_(torch.randn(4, 8))
    return moe


def expert_outputs(moe, x):
    """FFN_e(x_n) for every token and expert, by definition: [N, E, D]."""
    w_in, w_out = moe.experts.w_in, moe.experts.w_out
    return torch.stack([swiglu(x @ w_in[e]) @ w_out[e] for e in range(w_in.size(0))], 1)


@pytest.mark.parametrize('forward', [False, True])
@pytest.mark.parametrize('renorm', [False, True])
@given(N=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_dense_grad_gives_every_router_probability_its_gradient(renorm, forward, N, seed):
    """dL/dw_ne = <dy_n, FFN_e(x_n)> on the chosen experts, <dy_n, EMA_e> on all others: the router
    weights' gradient is that vector through the gate weights' Jacobian, and no entry of it is 0,
    whether or not the defaults are in the output too."""
    moe = default_moe(seed=seed, router_renorm=renorm, dense_grad_forward=forward)
    router = moe.router
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, N, 8, generator=gen)
    y, _, _, _ = moe(x, None)
    dy = torch.randn_like(y)
    (grad_w,) = torch.autograd.grad(y, router.w_g.weight, dy)

    xs, dys = x.view(N, 8), dy.view(N, 8)
    p = router.w_g(xs).detach().softmax(-1)  # [N, E]
    chosen = torch.zeros(N, 4).scatter(1, p.topk(2, -1).indices, 1.0)
    ffn = expert_outputs(moe, xs).detach()
    g = torch.where(chosen > 0, torch.einsum('nd,ned->ne', dys, ffn), dys @ router.expert_ema.t())  # dL/dw [N, E]
    assert (g != 0).all()  # every expert of every token gets a say
    if renorm:  # w = p / sum_chosen(p), chosen or not: through the normaliser
        sel = (p * chosen).sum(-1, keepdim=True)
        g = g / sel - chosen * (g * p).sum(-1, keepdim=True) / sel**2
    dlogits = p * (g - (p * g).sum(-1, keepdim=True))  # softmax Jacobian
    torch.testing.assert_close(grad_w, dlogits.t() @ xs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('score', ['softmax', 'sigmoid'])
def test_dense_grad_with_a_zero_ema_is_top_k(score):
    """Until the EMA holds something the layer is plain top-k, forward and backward: the chosen
    experts' output is unchanged, and the unchosen experts' defaults are 0."""
    dense = default_moe(ema=False, score=score, router_renorm=True)
    torch.manual_seed(0)
    plain = MoE(GPTConfig(n_embd=8, n_head=1, n_layer=1, n_expert=4, top_k=2, ffn_hidden=6, expert_impl='grouped',
                          aux_loss_coef=0.0, score=score, router_renorm=True))
    plain.load_state_dict(dense.state_dict(), strict=False)  # all but the EMA
    x = torch.randn(2, 6, 8)
    (y1, _, s1, _), (y2, _, _, _) = dense(x, None), plain(x, None)
    assert torch.equal(y1, y2)
    y1.square().sum().backward(), y2.square().sum().backward()
    for p1, p2 in zip(dense.parameters(), plain.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad)
    assert 'default_out' not in s1 and s1['expert_sum'].shape == (4, 8)  # the block took it out


def test_dense_grad_puts_the_defaults_in_the_gradient_only_unless_asked():
    """By default (the paper: sparse forward, dense backward) the output is plain top-k's, bit for
    bit, with a full EMA; every gradient for a given upstream dy is that of dense_grad_forward=True,
    whose output carries the defaults too."""
    bwd, fwd = default_moe(router_renorm=True), default_moe(router_renorm=True, dense_grad_forward=True)
    plain = MoE(GPTConfig(n_embd=8, n_head=1, n_layer=1, n_expert=4, top_k=2, ffn_hidden=6, expert_impl='grouped',
                          aux_loss_coef=0.0, router_renorm=True))
    plain.load_state_dict(bwd.state_dict(), strict=False)  # all but the EMA
    x = torch.randn(2, 6, 8)
    (yb, _, _, _), (yf, _, _, _), (yp, _, _, _) = bwd(x, None), fwd(x, None), plain(x, None)
    assert torch.equal(yb, yp)
    assert (yf - yp).abs().max() > 0.1  # the defaults' sum: of the order of the EMA (randn)
    dy = torch.randn_like(yb)
    grads = [dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(y, list(m.parameters()), dy)))
             for m, y in ((bwd, yb), (fwd, yf), (plain, yp))]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])
    # ... and not top-k's: the unchosen experts have their say in the router's
    assert not torch.allclose(grads[0]['router.w_g.weight'], grads[2]['router.w_g.weight'])


@pytest.mark.parametrize('impl', ['grouped', 'triton'])
def test_dense_grad_keeps_every_backend_equal_to_loop_and_sums_exact(impl):
    """Forward, every gradient and the experts' output sums the EMA learns from: the same in every
    backend, and the sums are those of FFN_e over each expert's tokens."""
    outs = []
    for backend in ('loop', impl):
        moe = default_moe(backend, score='sigmoid', router_renorm=True, route_scale=2.5)
        x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y, aux_loss, stats, _ = moe(x, None)
        (y.square().sum() + aux_loss).backward()
        outs.append((y, stats['expert_sum'], stats['expert_count'], x.grad, *(p.grad for p in moe.parameters())))
        if backend == 'loop':
            gates = moe.router(x.detach().view(16, 8))[0]
            ffn = expert_outputs(moe, x.detach().view(16, 8))
            torch.testing.assert_close(stats['expert_sum'], ((gates > 0)[..., None] * ffn).sum(0).detach())
            assert torch.equal(stats['expert_count'], (gates > 0).sum(0).float())
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_ema_follows_its_formula_and_keeps_what_no_token_updated():
    """EMA_e <- beta EMA_e + (1 - beta) sum_e / count_e, once per update; an expert with no tokens
    keeps its EMA. GPT.update_routers hands each layer its own sums and counts."""
    config = GPTConfig(n_layer=2, n_head=1, n_embd=4, ffn_hidden=8, n_expert=3, top_k=1, block_size=8,
                       vocab_size=32, dense_grad=True, dense_grad_beta=0.8)
    model = GPT(config)
    sums = torch.arange(24.0).view(2, 3, 4)
    counts = torch.tensor([[2.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    model.update_routers(torch.full((2, 3), 1 / 3), sums, counts)
    model.update_routers(torch.full((2, 3), 1 / 3), sums, counts)
    mean = sums / counts.clamp_min(1)[..., None]
    want = 0.2 * mean * (1 + 0.8)  # two steps from 0: (1 - b) m + b (1 - b) m
    want[0, 2] = 0  # never ran a token: still its initial 0
    torch.testing.assert_close(torch.stack([r.expert_ema for r in model.routers()]), want)


def test_the_ema_survives_checkpoints_casts_and_eval():
    config = GPTConfig(n_layer=2, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=2, block_size=8,
                       vocab_size=32, dense_grad=True)
    model = GPT(config)
    idx = torch.randint(0, 32, (2, 8))
    _, loss, info = model(idx, idx)
    model.update_routers(info['load'], info['expert_sum'], info['expert_count'])
    ema = torch.stack([r.expert_ema for r in model.routers()]).clone()
    assert ema.abs().sum() > 0
    model.eval()
    sample.generate(model, idx[:, :2], 3)  # sampling (a KV cache, T = 1 steps) reads it, never moves it
    model.train()
    model(idx, idx)[1].backward()
    assert torch.equal(torch.stack([r.expert_ema for r in model.routers()]), ema)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = GPT(config)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.to(torch.bfloat16)
    assert all(r.expert_ema.dtype == torch.float32 for r in fresh.routers())
    assert torch.equal(torch.stack([r.expert_ema for r in fresh.routers()]), ema)


def test_dense_grad_resumes_exactly(tmp_path, data_dir):
    """6 iterations in one go equal 3 + resume + 3 (two micro-steps each), the logged size of the
    EMA included: it was saved, and is moved from the same pooled sums."""
    common = ['--dense_grad=True', '--dense_grad_beta=0.5', '--score=sigmoid', '--router_renorm=True',
              '--balance=bias', '--seq_aux_coef=0.01', '--gradient_accumulation_steps=2', '--log_interval=1',
              '--eval_interval=3', '--warmup_iters=1', '--lr_decay_iters=6']
    train(tmp_path, data_dir, *common, '--max_iters=6', f'--out_dir={tmp_path}/straight')
    train(tmp_path, data_dir, *common, '--max_iters=3', f'--out_dir={tmp_path}/resumed')
    train(tmp_path, data_dir, *common, '--max_iters=6', '--init_from=resume', f'--out_dir={tmp_path}/resumed')
    logs = [{r['iter']: r for r in read_log(tmp_path / d) if 'loss' in r} for d in ('straight', 'resumed')]
    assert sorted(logs[1]) == list(range(6))
    for it in range(6):
        assert logs[1][it]['loss'] == pytest.approx(logs[0][it]['loss'], rel=1e-5), it
        assert logs[1][it]['default_norm'] == logs[0][it]['default_norm'], it
    assert logs[0][0]['default_norm'] == [0.0, 0.0] and logs[0][5]['default_norm'][0] > 0


@pytest.mark.parametrize('router', ['remoe', 'prototype', 'hash'])
def test_dense_grad_is_refused_beside_other_routers(router):
    import configurator
    why = configurator.ignored_options(dict(moe_every=1, router=router, dataset='shakespeare_char'))['dense_grad']
    assert why == f"with router={router!r}"


@pytest.mark.parametrize('bad, needle', [
    (dict(dense_grad=True, dense_grad_beta=1.0), r'dense_grad_beta=1.0 must be in \[0, 1\)'),
    (dict(dense_grad_forward=True), 'dense_grad_forward=True needs dense_grad=True'),
])
def test_bad_dense_grad_values_are_one_line_errors(bad, needle):
    with pytest.raises(ValueError, match=needle) as e:
        GPTConfig(**bad).validate()
    assert '\n' not in str(e.value)
