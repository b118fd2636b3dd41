"""
Tests for kernels.py, launcher by launcher, against plain torch: the grouped GEMM with its in-kernel
gather and gate epilogue, the per-expert weight gradient, the deterministic combine, and the two
ops experts.py registers over them (schema, fake, autograd, a fullgraph trace). The whole triton
backend against the loop reference, forward and every gradient, is in test_experts.py.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before kernels.py
is imported. It runs every program of a launch in Python, so the shapes here stay small.
Shape legend as in kernels.py: N tokens, E experts, D width, H expert hidden, M active pairs.
"""


import torch

import pytest

pytest.importorskip('triton')  # not installable on macOS: nothing to test there

from hypothesis import given, settings, strategies as st

import experts
import kernels

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
TOL = dict(rtol=1e-5, atol=1e-5)


def routed(N, E, p, seed):
    """Random gates [N, E] with about a fraction p active, and experts.triton_routing's index lists."""
    gen = torch.Generator().manual_seed(seed)
    gates = (0.1 + torch.rand(N, E, generator=gen)) * (torch.rand(N, E, generator=gen) < p)
    gates = gates.to(DEVICE)
    return gates, *experts.triton_routing(gates)


def expert_of_row(ends, M):
    """[M] the expert of each pair row, from the ends of the experts' runs."""
    return torch.searchsorted(ends, torch.arange(M, device=ends.device), right=True)


shapes = dict(N=st.integers(1, 24), Q=st.integers(1, 40), P=st.integers(1, 40), E=st.integers(1, 64),
              p=st.sampled_from([0.0, 0.1, 0.5, 1.0]), seed=st.integers(0, 2**16))


@settings(max_examples=10, deadline=None)
@given(**shapes)
def test_grouped_gemm_gathers_and_scales(N, Q, P, E, p, seed):
    gates, pairs, ends, order, starts = routed(N, E, p, seed)
    expert, token = pairs
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N, Q, generator=gen).to(DEVICE)
    b = torch.randn(E, P, Q, generator=gen).to(DEVICE).transpose(1, 2)   # strided, as in the backward
    g = gates[token, expert]
    got = kernels.grouped_gemm(a, token, b, ends, scale=g)                # [M, P]
    want = g[:, None] * torch.bmm(a[token][:, None], b[expert])[:, 0]
    torch.testing.assert_close(got, want, **TOL)
    assert (expert_of_row(ends, len(token)) == expert).all()


@settings(max_examples=10, deadline=None)
@given(**shapes)
def test_grouped_wgrad_sums_each_experts_rows(N, Q, P, E, p, seed):
    gates, pairs, ends, order, starts = routed(N, E, p, seed)
    expert, token = pairs
    M = len(token)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(M, Q, generator=gen).to(DEVICE)          # pair rows, read in place
    b = torch.randn(N, P, generator=gen).to(DEVICE)          # token rows, gathered
    g = gates[token, expert]
    got = kernels.grouped_wgrad(a, torch.arange(M, device=DEVICE), b, token, ends, E, scale=g)   # [E, Q, P]
    want = torch.zeros(E, Q, P, device=DEVICE)
    want.index_add_(0, expert, a[:, :, None] * (g[:, None] * b[token])[:, None, :])
    torch.testing.assert_close(got, want, **TOL)             # an expert without rows: exact zeros


def test_combine_is_deterministic_and_exact_for_empty_tokens():
    N, E, D = 9, 6, 20
    gates, *_ = routed(N, E, 0.5, 0)
    gates[4] = 0                                             # a token with no expert (ReLU routing)
    (expert, token), ends, order, starts = experts.triton_routing(gates)
    rows = torch.randn(len(token), D, device=DEVICE)
    y = kernels.combine(rows, order, starts, N)
    # each token's rows summed one by one in expert order, as the kernel does: bitwise equal
    want = torch.zeros(N, D, device=DEVICE)
    for i in order.tolist():
        want[token[i]] += rows[i]
    assert torch.equal(y, want)
    assert torch.equal(kernels.combine(rows, order, starts, N), y)
    assert (y[4] == 0).all()


def test_no_pairs_at_all():
    N, E, D, H = 5, 3, 4, 2
    x = torch.randn(N, D, device=DEVICE)
    w_in, w_out = torch.randn(E, D, 2 * H, device=DEVICE), torch.randn(E, H, D, device=DEVICE)
    y, *_ = experts.triton_ffn(x, torch.zeros(N, E, device=DEVICE), w_in, w_out)
    assert (y == 0).all()


def test_routing_index_lists():
    gates = torch.tensor([[0.0, 0.5, 0.2],
                          [0.0, 0.0, 0.0],
                          [0.3, 0.0, 0.7]])
    pairs, ends, order, starts = experts.triton_routing(gates)
    assert pairs.tolist() == [[0, 1, 2, 2], [2, 0, 0, 2]]    # (expert, token), by expert
    assert ends.tolist() == [1, 2, 4]
    assert order.tolist() == [1, 2, 0, 3]                    # token 0: experts 1, 2; token 2: 0, 2
    assert starts.tolist() == [0, 2, 2, 4]


def make_op_inputs(N=7, D=6, H=3, E=4, seed=0):
    gates, *_ = routed(N, E, 0.5, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen).to(DEVICE)
    w_in = (torch.randn(E, D, 2 * H, generator=gen) / D ** 0.5).to(DEVICE)
    w_out = (torch.randn(E, H, D, generator=gen) / H ** 0.5).to(DEVICE)
    return [t.requires_grad_() for t in (x, gates, w_in, w_out)]


def test_op_registration():
    # schema, fake kernel and autograd registration, checked by torch itself
    torch.library.opcheck(experts.triton_ffn, make_op_inputs())


def test_traces_fullgraph_without_recompiling():
    """The fake kernel's dynamic size M lets one graph serve every routing. aot_eager traces what
    inductor would see (the op stays opaque to both) without generating code for it."""
    counts = []

    def counting_backend(gm, example_inputs):
        counts.append(1)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def loss_fn(x, gates, w_in, w_out):
        return (experts.triton_ffn(x, gates, w_in, w_out)[0] ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counting_backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):                                # three routings, three pair counts
            inputs = make_op_inputs(seed=seed)
            got, want = compiled(*inputs), loss_fn(*inputs)
            torch.testing.assert_close(got, want, **TOL)
            for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
                torch.testing.assert_close(g, w, **TOL)
    assert len(counts) == 1
