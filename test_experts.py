"""
Tests for experts.py: every backend against the loop reference, forward and all four gradients,
including degenerate routings; the loop reference against a dense brute-force formula; the
grouped backend under torch.compile(fullgraph=True) without recompiling as the routing changes;
and the whole model compiled with every router, trained a few steps, equal to eager.

Without a GPU the triton backend runs under Triton's interpreter (slow: shapes stay small).
Shape legend as in experts.py: N tokens, E experts, K active per token, D width, H expert hidden.
"""

import copy
import importlib.util

import torch

import pytest
from hypothesis import given, settings, strategies as st

import routers
import experts
from experts import EXPERT_IMPLS, Experts, grouped_ffn, moe_ffn, resolve_impl
import pairs
from pairs import routed_pairs, swiglu, swiglu_backward
from conftest import router_config
from model import GPT, GPTConfig

TOL = dict(rtol=1e-5, atol=1e-5)
HAS_TRITON = importlib.util.find_spec('triton') is not None
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
# every fast backend is checked against loop; without triton (macOS) its cases are skipped
BACKENDS = ['grouped', pytest.param('triton', marks=pytest.mark.skipif(not HAS_TRITON, reason='no triton'))]


def make_gates(N, E, active, gen):
    """Random non-negative gates [N, E] whose non-zero pattern is the bool mask active [N, E]."""
    return (0.1 + torch.rand(N, E, generator=gen)) * active


def relu_mask(N, E, gen):
    """ReLU-like routing: each token gets a random number of experts in [0, E]."""
    k = torch.randint(0, E + 1, (N, 1), generator=gen)                 # [N, 1]
    rank = torch.rand(N, E, generator=gen).argsort(dim=1).argsort(dim=1)
    return rank < k                                                     # [N, E]


def topk_mask(N, E, K, gen):
    """Top-k-like routing: exactly K experts per token."""
    return torch.rand(N, E, generator=gen).argsort(dim=1).argsort(dim=1) < K


def make_inputs(N, D, H, E, active, seed=0):
    """x [N, D], gates [N, E], w_in [E, D, 2H], w_out [E, H, D], dy [N, D], all requiring grad.
    Weights are scaled so that outputs are O(1) and the tolerances mean something."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    gates = make_gates(N, E, active, gen)
    w_in = torch.randn(E, D, 2 * H, generator=gen) / D ** 0.5
    w_out = torch.randn(E, H, D, generator=gen) / H ** 0.5
    dy = torch.randn(N, D, generator=gen)
    return [t.requires_grad_() for t in (x, gates, w_in, w_out)], dy


def run(impl, inputs, dy):
    """y and the gradients of (x, gates, w_in, w_out) for upstream gradient dy."""
    y = moe_ffn(*inputs, impl)
    return (y, *torch.autograd.grad(y, inputs, dy))


def dense_reference(x, gates, w_in, w_out):
    """Brute force: every expert on every token, y = sum_e gates[:, e] * FFN_e(x)."""
    h = torch.einsum('nd,edf->enf', x, w_in)                            # [E, N, 2H]
    o = torch.einsum('enh,ehd->end', swiglu(h), w_out)                  # [E, N, D]
    return torch.einsum('ne,end->nd', gates, o)                         # [N, D]


def assert_matches_loop(inputs, dy, impl='grouped'):
    names = ('y', 'dx', 'dgates', 'dw_in', 'dw_out')
    outputs = run(impl, inputs, dy)
    for name, got, want in zip(names, outputs, run('loop', inputs, dy)):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f'{impl} {name}: {m}')
    with torch.inference_mode():  # eager inference calls the grouped op's body without the op: the same numbers
        assert torch.equal(moe_ffn(*inputs, impl), outputs[0])

# -----------------------------------------------------------------------------
# every backend vs loop on random shapes and routings


shapes = dict(N=st.integers(1, 32), D=st.integers(1, 24), H=st.integers(1, 16), E=st.integers(1, 64),
              seed=st.integers(0, 2**16))


@pytest.mark.parametrize('impl', BACKENDS)
@settings(max_examples=12, deadline=None)
@given(**shapes)
def test_backend_matches_loop_relu_routing(impl, N, D, H, E, seed):
    gen = torch.Generator().manual_seed(seed)
    assert_matches_loop(*make_inputs(N, D, H, E, relu_mask(N, E, gen), seed), impl)


@pytest.mark.parametrize('impl', BACKENDS)
@settings(max_examples=12, deadline=None)
@given(**shapes, data=st.data())
def test_backend_matches_loop_topk_routing(impl, N, D, H, E, seed, data):
    K = data.draw(st.integers(1, min(E, 8)), label='K')
    gen = torch.Generator().manual_seed(seed)
    assert_matches_loop(*make_inputs(N, D, H, E, topk_mask(N, E, K, gen), seed), impl)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 6), D=st.integers(1, 24), H=st.integers(1, 16), E=st.integers(1, 16),
       seed=st.integers(0, 2**16), relu=st.booleans())
def test_decode_path_matches_loop(N, D, H, E, seed, relu):
    """decode_ffn, the generation step's pair-by-pair path, computes the loop's forward (it has no
    backward: generation runs under inference_mode)."""
    gen = torch.Generator().manual_seed(seed)
    active = relu_mask(N, E, gen) if relu else topk_mask(N, E, min(E, 2), gen)
    (x, gates, w_in, w_out), _ = make_inputs(N, D, H, E, active, seed)
    with torch.inference_mode():
        torch.testing.assert_close(experts.decode_ffn(x, gates, w_in, w_out), moe_ffn(x, gates, w_in, w_out, 'loop'), **TOL)
        if not active.any():
            assert (experts.decode_ffn(x, gates, w_in, w_out) == 0).all()

# -----------------------------------------------------------------------------
# degenerate routings


def degenerate_mask(case):
    N, E = 9, 4
    active = torch.rand(N, E, generator=torch.Generator().manual_seed(1)) < 0.5
    if case == 'empty_expert':
        active[:, 2] = False
    elif case == 'one_expert':
        active[:] = False
        active[:, 1] = True
    elif case == 'token_without_expert':
        active[3] = False
        active[7] = False
    elif case == 'single_token':
        active = active[:1]
        active[0, 0] = True
    elif case == 'every_expert':
        active[:] = True
    return active


@pytest.mark.parametrize('impl', BACKENDS)
@pytest.mark.parametrize('case', ['empty_expert', 'one_expert', 'token_without_expert',
                                  'single_token', 'every_expert'])
@pytest.mark.parametrize('D,H', [(8, 4), (5, 3)])
def test_degenerate_routings(case, D, H, impl):
    active = degenerate_mask(case)
    inputs, dy = make_inputs(active.size(0), D, H, active.size(1), active)
    assert_matches_loop(inputs, dy, impl)
    if case == 'token_without_expert':
        y = moe_ffn(*inputs, impl)
        assert (y[[3, 7]] == 0).all()                   # such a token keeps only its residual


@pytest.mark.parametrize('impl', ['loop', *BACKENDS])
def test_every_gate_zero(impl):
    # M = 0: no pair at all. Exact zeros out, exact zeros back, and no error
    inputs, dy = make_inputs(6, 5, 3, 4, torch.zeros(6, 4, dtype=torch.bool))
    for t in run(impl, inputs, dy):
        assert (t == 0).all()



@pytest.mark.parametrize('D,H', [(8, 4), (5, 3)])   # (5, 3): odd widths, grouped_mm's zero-padding
@pytest.mark.parametrize('case', ['relu', 'empty_expert'])
def test_grouped_mm_path_matches_cpu_expert_major_path(case, D, H):
    # the grouped backend runs its experts two ways: expert by expert on CPU (the path every other
    # test here takes without a GPU), and F.grouped_mm per weight on CUDA. grouped_mm also runs on a
    # CPU, so the CUDA path's padding and bookkeeping are checked against the CPU path here
    N, E = 11, 4
    active = relu_mask(N, E, torch.Generator().manual_seed(3))
    if case == 'empty_expert':
        active[:, 1] = False
    (x, gates, w_in, w_out), dy = make_inputs(N, D, H, E, active)
    x, gates, w_in, w_out = x.detach(), gates.detach(), w_in.detach(), w_out.detach()
    (expert, token), counts = routed_pairs(gates)
    offs, g = counts.cumsum(0).to(torch.int32), gates[token, expert]
    fwd = [pairs.experts_forward(x, token, g, w_in, w_out, offs, expert_major=m) for m in (True, False)]
    for name, got, want in zip(('y', 'h', 'o'), *fwd):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f'{name}: {m}')
    _, h, o = fwd[0]
    bwd = [pairs.experts_backward(dy, x, token, g, h, o, w_in, w_out, offs, expert_major=m) for m in (True, False)]
    for name, got, want in zip(('dx', 'dg', 'dw_in', 'dw_out'), *bwd):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f'{name}: {m}')

# -----------------------------------------------------------------------------
# the reference itself


@settings(max_examples=15, deadline=None)
@given(**shapes)
def test_loop_matches_dense_formula(N, D, H, E, seed):
    active = relu_mask(N, E, torch.Generator().manual_seed(seed))
    inputs, dy = make_inputs(N, D, H, E, active, seed)
    y, dx, dgates, dw_in, dw_out = run('loop', inputs, dy)
    y_ref = dense_reference(*inputs)
    dx_ref, dgates_ref, dw_in_ref, dw_out_ref = torch.autograd.grad(y_ref, inputs, dy)
    for got, want in [(y, y_ref), (dx, dx_ref), (dw_in, dw_in_ref), (dw_out, dw_out_ref)]:
        torch.testing.assert_close(got, want, **TOL)
    # the dense formula computes FFN_e for inactive experts too, so their gate gradient is
    # <dy, FFN_e(x)> there; the contract says 0 (never computed, never selected)
    torch.testing.assert_close(dgates[active], dgates_ref[active], **TOL)
    assert (dgates[~active] == 0).all()

# -----------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_no_recompile():
    from torch._inductor.compile_fx import compile_fx
    compiles = []

    def counting_inductor(gm, example_inputs):
        compiles.append(gm)
        return compile_fx(gm, example_inputs)

    def loss_fn(x, gates, w_in, w_out):
        return (moe_ffn(x, gates, w_in, w_out, 'grouped') ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counting_inductor)
    N, D, H, E = 6, 5, 3, 3
    gen = torch.Generator().manual_seed(0)
    routings = [relu_mask(N, E, gen), topk_mask(N, E, 1, gen), torch.zeros(N, E, dtype=torch.bool)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for active in routings:                         # three different pair counts M
            inputs, _ = make_inputs(N, D, H, E, active)
            got = compiled(*inputs)
            want = loss_fn(*inputs)
            torch.testing.assert_close(got, want, **TOL)
            for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
                torch.testing.assert_close(g, w, **TOL)
    assert len(compiles) == 1


def test_custom_op_registration():
    # schema, fake kernel and autograd registration, checked by torch itself
    inputs, _ = make_inputs(7, 5, 3, 4, relu_mask(7, 4, torch.Generator().manual_seed(0)))
    torch.library.opcheck(grouped_ffn, inputs)

# -----------------------------------------------------------------------------
# dtypes, module, config strings


@pytest.mark.parametrize('impl', BACKENDS)
def test_bf16_autocast_close_to_fp32(impl):
    inputs, dy = make_inputs(16, 8, 8, 4, relu_mask(16, 4, torch.Generator().manual_seed(0)))
    want = run('loop', inputs, dy)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = moe_ffn(*inputs, impl)
    assert y.dtype == torch.bfloat16
    got = (y, *torch.autograd.grad(y, inputs, dy.bfloat16()))
    assert all(g.dtype == t.dtype for g, t in zip(got[1:], inputs))   # grads come back in fp32
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2)


def test_swiglu_backward_is_autograds():
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    da = torch.randn(7, 5, dtype=torch.float64)
    (want,) = torch.autograd.grad(swiglu(h), h, da)
    torch.testing.assert_close(swiglu_backward(da, h.detach()), want)


def test_experts_module():
    torch.manual_seed(0)
    experts = Experts(n_expert=4, n_embd=8, hidden=6)
    assert experts.w_in.shape == (4, 8, 12) and experts.w_out.shape == (4, 6, 8)
    assert abs(experts.w_in.std().item() - 0.02) < 0.005
    x = torch.randn(10, 8)
    gates = make_gates(10, 4, relu_mask(10, 4, torch.Generator().manual_seed(0)), None)
    torch.testing.assert_close(experts(x, gates), moe_ffn(x, gates, experts.w_in, experts.w_out, 'loop'),
                               **TOL)


def test_resolve_impl(monkeypatch):
    assert resolve_impl('auto', 'cpu') == 'grouped'
    assert resolve_impl('auto', 'cuda') == ('triton' if HAS_TRITON else 'grouped')
    assert resolve_impl('loop', 'cpu') == 'loop'
    # every name the config accepts runs, here on CPU (triton under the interpreter), as loop does
    inputs, _ = make_inputs(6, 4, 3, 3, relu_mask(6, 3, torch.Generator().manual_seed(0)))
    want = moe_ffn(*inputs, 'loop')
    for impl in EXPERT_IMPLS:
        if impl != 'triton' or HAS_TRITON:
            torch.testing.assert_close(moe_ffn(*inputs, resolve_impl(impl, 'cpu')), want, **TOL)
    with pytest.raises(ValueError) as err:
        resolve_impl('foo', 'cpu')
    assert str(err.value) == "expert_impl='foo' is not one of loop, grouped, triton, auto"
    with pytest.raises(ValueError, match='foo'):
        Experts(2, 4, 4, impl='foo')
    Experts(2, 4, 4, impl='triton')  # built on CPU, may still move to a GPU: no error yet
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match='needs') as err:   # triton on CPU without the interpreter
        resolve_impl('triton', 'cpu')
    assert len(str(err.value).splitlines()) == 1

# -----------------------------------------------------------------------------
# the whole model, compiled


@pytest.mark.parametrize('router', routers.ROUTERS)
def test_compiled_model_trains_like_eager(router):
    """fullgraph compile of a tiny MoE GPT with each router: no graph break (fullgraph raises), no
    recompilation over 3 optimizer steps whose routings differ, and the eager losses. On CPU the
    dispatch is grouped: the triton backend's compile path is only worth testing on a GPU, where
    it is the one that runs (without a GPU it would run the interpreter inside compiled code)."""
    torch.manual_seed(0)
    impl = 'triton' if DEVICE == 'cuda' and HAS_TRITON else 'grouped'
    config = GPTConfig(**router_config(router, n_layer=2, n_head=2, n_embd=16, ffn_hidden=8, n_expert=4, top_k=2,
                                       block_size=8, vocab_size=64, expert_impl=impl))
    eager = GPT(config).to(DEVICE)
    compiled = copy.deepcopy(eager)
    step_compiled = torch.compile(compiled, fullgraph=True, dynamic=False)
    # SGD, not Adam: Adam's first steps move every weight by ~lr whatever its gradient's size, so a
    # 1e-9 rounding difference in a near-zero gradient would show as a 1e-5 weight difference
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled)]
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    # a router that samples (SparseMixer-v2) draws the same numbers in both: the same seed before each
    # forward, and inductor's random ops falling back to eager's generator
    with torch._dynamo.config.patch(error_on_recompile=True), torch._inductor.config.patch(fallback_random=True):
        for step in range(3):
            idx = torch.randint(0, 64, (2, 8), generator=gen).to(DEVICE)
            losses = []
            for model, forward, opt in zip((eager, compiled), (eager, step_compiled), optimizers):
                torch.manual_seed(step)
                _, loss, _ = forward(idx, idx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), step
    for p, q in zip(eager.parameters(), compiled.parameters()):   # after 3 steps, the same weights
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
