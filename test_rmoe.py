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


# -----------------------------------------------------------------------------
# RMoE Table 5's information-flow variants (rmoe_flow), the paper code's init (rmoe_init)


def chain(routers, xs, states=None):
    """Run the routers one after another on independent inputs xs (only the state links them);
    states[i], where given, replaces the state layer i receives. Returns every layer's gates, logits."""
    gates, logits, state = [], [], None
    for i, (r, x) in enumerate(zip(routers, xs)):
        if states is not None and states[i] is not None:
            state = states[i]
        logits.append(r.logits(x, state)[0])
        g, _, _, state = r(x, state)
        gates.append(g)
    return gates, logits


def flow_routers(flow, router='topk', n_layer=3, **kw):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=n_layer, n_head=1, n_embd=8, ffn_hidden=8, n_expert=4, top_k=2, router=router,
                       recurrent_router=True, rmoe_dim=6, block_size=8, vocab_size=32, rmoe_flow=flow, **kw)
    model = GPT(config)
    return model, [b.mlp.router for b in model.transformer.h]


@pytest.mark.parametrize('router', ['topk', 'remoe'])
def test_detached_flow_has_rmoes_forward_and_no_gradient_across_layers(router):
    """rmoe_flow='detach': the very forward of RMoE (same weights, same seed); the last layer's
    gates give no gradient to the first projector, and the shared GRU's gradient is that of the
    last layer's own step, from the previous state as a constant."""
    (pass_model, passing), (det_model, detached) = flow_routers('pass', router), flow_routers('detach', router)
    det_model.load_state_dict(pass_model.state_dict())
    xs, w = [torch.randn(5, 8) for _ in passing], torch.randn(5, 4)
    for a, b in zip(chain(passing, xs)[0], chain(detached, xs)[0]):
        assert torch.equal(a, b)
    idx = torch.randint(0, 32, (2, 8))
    (_, loss_p, info_p), (_, loss_d, info_d) = pass_model(idx, idx), det_model(idx, idx)
    assert torch.equal(loss_p, loss_d) and all(torch.equal(info_p[k], info_d[k]) for k in info_p)

    gates, _ = chain(detached, xs)
    gru = detached[0].gru
    got = torch.autograd.grad((gates[-1] * w).sum(), [detached[0].proj.weight, *gru.parameters()], allow_unused=True)
    assert got[0] is None or torch.count_nonzero(got[0]) == 0
    with torch.no_grad():  # the state the last layer received, as a constant
        state = None
        for r, x in zip(detached[:-1], xs[:-1]):
            state = r.logits(x, state)[1]
    last = detached[-1]
    h = gru(last.proj(xs[-1]), state)
    own = last.w_g(h)
    g_own = {'topk': lambda z: z.softmax(-1), 'remoe': torch.relu}[router](own)
    mask = (gates[-1] > 0).float()  # the experts it kept (top-k without renormalisation: gates = kept probs)
    want = torch.autograd.grad((g_own * mask * w).sum(), list(gru.parameters()))
    for a, b in zip(got[1:], want):
        torch.testing.assert_close(a, b)


def test_passing_flow_has_a_gradient_across_layers():
    _, passing = flow_routers('pass')
    xs, w = [torch.randn(5, 8) for _ in passing], torch.randn(5, 4)
    gates, _ = chain(passing, xs)
    (grad,) = torch.autograd.grad((gates[-1] * w).sum(), passing[0].proj.weight)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize('router', ['topk', 'remoe', 'prototype'])
def test_no_passing_flow_routes_each_layer_from_its_own_input(router):
    """rmoe_flow='none' (NP): layer i's routing does not depend on layers < i. Perturbing the
    earlier layers' inputs, or the state handed to a layer, changes nothing in it; with 'pass' it does."""
    for flow in ('none', 'pass'):
        _, routers = flow_routers(flow, router)
        xs = [torch.randn(5, 8) for _ in routers]
        moved = [x + torch.randn_like(x) for x in xs[:-1]] + [xs[-1]]
        (_, base), (_, after) = chain(routers, xs), chain(routers, moved)
        foreign = chain(routers, xs, states=[None, None, torch.randn(5, 6)])[1]
        same = torch.equal(base[-1], after[-1]) and torch.equal(base[-1], foreign[-1])
        assert same == (flow == 'none'), flow
        if flow == 'none':  # and each layer is the stateless GRU on its own input
            for r, x, z in zip(routers, xs, base):
                torch.testing.assert_close(z, r.w_g(r.gru(r.proj(x))), rtol=0, atol=0)


def test_flows_have_the_same_parameters():
    counts = {flow: sum(p.numel() for p in flow_routers(flow)[0].parameters()) for flow in ('pass', 'detach', 'none')}
    assert len(set(counts.values())) == 1, counts


def test_torch_init_is_pytorchs_own_with_biases():
    """rmoe_init='torch' (the paper's enwik8 code): the GRU keeps U(±1/sqrt(p)), projector and
    router get biases and PyTorch's Linear init; the router starts with a gain like top-k's, where
    the normal(0.02) init starts near-uniform (logit std ~0.003 at p=64, d=128)."""
    p, D, E, L = 64, 128, 8, 4
    models, stds = {}, {}
    for init in ('normal', 'torch'):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=L, n_head=4, n_embd=D, ffn_hidden=256, n_expert=E, top_k=2, block_size=32,
                           vocab_size=64, recurrent_router=True, rmoe_dim=p, rmoe_init=init)
        model = models[init] = GPT(config)
        _, _, info = model(torch.randint(0, 64, (4, 32)))
        stds[init] = info['logit_std']
    n_router = {k: sum(x.numel() for n, x in m.named_parameters() if '.router.' in n) for k, m in models.items()}
    assert n_router['torch'] - n_router['normal'] == L * (p + E)  # the two biases per layer
    r = models['torch'].transformer.h[0].mlp.router
    bound = 1 / p ** 0.5
    for w in (r.gru.weight_ih, r.gru.weight_hh, r.gru.bias_ih, r.gru.bias_hh):
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.15)
    assert r.w_g.bias is not None and r.proj.bias is not None and r.proj.bias.abs().max() <= 1 / D ** 0.5
    assert r.proj.weight.std().item() == pytest.approx(1 / (3 * D) ** 0.5, rel=0.1)  # not init_std's 0.02
    assert torch.all(stds['normal'] < 0.01) and torch.all(stds['torch'] > 0.05)


@pytest.mark.parametrize('bad', [dict(rmoe_flow='detached'), dict(rmoe_init='kaiming')])
def test_rmoe_knobs_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GPTConfig(recurrent_router=True, **bad).validate()


def test_rmoe_knobs_are_refused_without_the_recurrent_router():
    import configurator
    c = dict(moe_every=1, router='topk', recurrent_router=False, balance='aux', dataset='shakespeare_char')
    assert {'rmoe_dim', 'rmoe_flow', 'rmoe_init'} <= set(configurator.ignored_options(c))
    assert 'rmoe_flow' not in configurator.ignored_options({**c, 'recurrent_router': True})


# -----------------------------------------------------------------------------
# the routing statistics that tell the hypotheses apart (router gain, output scale, RMoE Table 8)


@pytest.mark.parametrize('renorm', [False, True])
def test_routing_stats_of_topk(renorm):
    from softmax_routers import TopKRouter
    torch.manual_seed(0)
    config = GPTConfig(n_embd=16, n_head=1, n_layer=1, n_expert=8, top_k=2, router_renorm=renorm)
    router, x = TopKRouter(config), torch.randn(64, 16)
    gates, _, stats, _ = router(x)
    logits = router.w_g(x)
    probs = logits.softmax(-1)
    top = probs.topk(2, -1).values
    kept = top.sum(-1).mean()
    torch.testing.assert_close(stats['logit_std'], logits.std(-1).mean())
    torch.testing.assert_close(stats['kept_prob'], kept)  # OB: before renormalisation
    torch.testing.assert_close(stats['gate_sum'], torch.tensor(1.0) if renorm else kept)
    torch.testing.assert_close(stats['top1_top2'], (top[:, 0] / top[:, 1]).median())  # IB
    assert stats['top1_top2'] >= 1


def test_routing_stats_reach_the_log_per_layer():
    idx = torch.randint(0, 32, (2, 8))
    for router in ('topk', 'remoe'):
        model, _ = flow_routers('pass', router, n_layer=2)
        record = model.routing_log(model(idx, idx)[2])
        for key in ('router_logit_std', 'gate_sum', 'router_entropy', *(('kept_prob', 'top1_top2') * (router == 'topk'))):
            assert len(record[key]) == 2, key
        if router == 'remoe':  # no probabilities: no OB / IB
            assert 'kept_prob' not in record and 'top1_top2' not in record


@pytest.mark.parametrize('flow, extra', [('detach', dict(rmoe_init='torch', router_renorm=True)),
                                         ('none', {}), ('pass', dict(router='prototype'))])
def test_rmoe_variants_compile_fullgraph_like_eager(flow, extra):
    """fullgraph compile (a graph break raises) of every flow, with the new statistics: the eager
    losses and statistics over two SGD steps, no recompilation."""
    import copy
    torch._dynamo.reset()
    model, _ = flow_routers(flow, n_layer=2, **extra)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, compiled_model)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(2):
            idx = torch.randint(0, 32, (2, 8))
            out = []
            for fn, opt in ((model, opts[0]), (compiled, opts[1])):
                _, loss, info = fn(idx, idx)
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append((loss.detach(), info))
            torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
            for k in ('logit_std', 'gate_sum', 'kept_prob', 'top1_top2'):
                torch.testing.assert_close(out[1][1][k], out[0][1][k], rtol=1e-4, atol=1e-5)
