"""
The experts' arithmetic on their routed pairs, which every backend of experts.py shares.

A gate matrix gates [N, E] activates M (token, expert) pairs, its non-zeros. routed_pairs lists them
by expert and then by token; the E SwiGLU FFNs then run over each expert's run of pairs, forward
and backward by hand (the custom ops of experts.py call these, so autograd never sees the pairs):
with F.grouped_mm, one call per weight (CUDA), or on CPU with an expert-major loop of plain matmuls.

Shape legend, as in experts.py: N tokens, E experts, D model width, H expert hidden size, M active
pairs, M_e the pairs of expert e. The grouped-matmul helpers are generic: [M, Q] @ [E, Q, P] -> [M, P].
"""

import torch
import torch.nn.functional as F


def swiglu(h):
    """[..., 2H] -> [..., H]: first half is the gate projection, second half the up projection."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(da, h, silu_gate=None):
    """The gradient of swiglu at h [M, 2H], given da [M, H]: dh [M, 2H], written straight into its
    two halves. aten's fused silu_backward is several times faster on CPU than spelling out
    silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z), in elementwise ops. silu_gate: F.silu of h's
    first half, if the caller has already computed it (one pass over [M, H] fewer)."""
    hg, hu = h.chunk(2, dim=-1)
    dh = torch.empty_like(h)
    H = hg.size(-1)
    torch.ops.aten.silu_backward.grad_input(da * hu, hg, grad_input=dh[:, :H])
    torch.mul(da, F.silu(hg) if silu_gate is None else silu_gate, out=dh[:, H:])
    return dh


def routed_pairs(gates):
    """The active (expert, token) pairs of gates [N, E], listed by expert and then by token, the
    order every backend of experts.py and expert parallelism (distributed.py) use: pairs [2, M] (expert ids, token ids) and
    counts [E], the pairs of each expert. nonzero walks gates.t() [E, N] row by row, so the order
    comes deterministic and without a sort."""
    pairs = gates.t().nonzero().t().contiguous()                             # [2, M]
    return pairs, torch.bincount(pairs[0], minlength=gates.size(1))          # [2, M], [E]


def flat_pairs(gates, expert, token):
    """The position of each pair's gate in gates.view(-1): [M]. Reading (index_select) and writing
    (index_copy_) gates through it is several times faster on CPU than gates[token, expert] advanced
    indexing; so is x.index_select(0, token) against x[token], used for every row gather here."""
    return token * gates.size(1) + expert


def _align(n, t):
    """n rounded up so that n elements of t's dtype fill a multiple of 16 bytes."""
    step = max(1, 16 // t.element_size())
    return -(-n // step) * step


def _pad_last(t, n):
    """Zero-pad the last dim of t to size n; contiguous, as grouped_mm wants."""
    return F.pad(t, (0, n - t.size(-1))).contiguous() if n != t.size(-1) else t.contiguous()


def _gmm(a, b, offs):
    """Per expert e: a[rows of e] @ b[e], with F.grouped_mm (CUDA; CPU runs the expert-major loop below).
    a [M, Q] rows sorted by expert, b [E, Q, P], offs [E] int32 end row of each expert -> [M, P]."""
    # grouped_mm wants every row stride to be a multiple of 16 bytes (4 fp32, 8 bf16), so odd
    # widths are zero-padded: padding the summed dim Q adds zeros, padded P columns are dropped.
    Q, P = b.shape[1:]
    Qp, Pp = _align(Q, a), _align(P, a)
    a = _pad_last(a, Qp)
    b = _pad_last(F.pad(b, (0, 0, 0, Qp - Q)), Pp)
    return F.grouped_mm(a, b, offs=offs)[:, :P].contiguous()


def _gmm_wgrad(a, b, offs):
    """Per expert e: a[rows of e].T @ b[rows of e], the weight gradient, with F.grouped_mm.
    a [M, Q], b [M, P], both sorted by expert, offs [E] -> [E, Q, P]."""
    Q, P = a.size(1), b.size(1)
    a, b = _pad_last(a, _align(Q, a)), _pad_last(b, _align(P, b))
    # a.t() must stay a transposed *view*: its row stride is then Q, while .contiguous() would make
    # it M, which is not 16-byte aligned in general
    return F.grouped_mm(a.t(), b, offs=offs)[:, :Q, :P].contiguous()

# On CPU, where grouped_mm is itself a loop over the experts, the loop is ours and runs expert-major:
# each expert's matmuls and the SwiGLU between them (forward: both matmuls; backward: all four and the
# SwiGLU's gradient) before the next expert's, so every element-wise pass reads an [M_e, *] block that
# the matmul before it has just written and that is still in cache. Layer-major (one matmul for every
# expert, then the SwiGLU over all M rows from memory) was up to 1.4x slower. The gathers, the gate
# products and the scatter-adds, which read each row once, run once over all M pairs, outside the loop:
# 3 ops a layer instead of 3 an expert (layer forward+backward 2-4 % faster at N 2048, D 128, E 8).


def _expert_rows(offs):
    """The rows of each expert, as a list, from offs [E] (the end row of each expert)."""
    return offs.diff(prepend=offs.new_zeros(1)).tolist()


def experts_forward(x, token, g, w_in, w_out, offs, expert_major):
    """The E FFNs on the pairs (token [M] sorted by expert, gate g [M]) of x [N, D] -> y [N, D], and
    h [M, 2H] and o [M, D] (the expert outputs before the gate) for the backward.
    expert_major: the CPU loop (see above), else F.grouped_mm per weight."""
    xs = x.index_select(0, token)                                            # [M, D]
    if expert_major:
        # every per-expert view is cut once up front: with 8 experts and small blocks, the loop's Python
        # and dispatch (about 3 us a call) is a visible share of the layer
        M, H, rows = len(token), w_out.size(1), _expert_rows(offs)
        h, o = x.new_empty(M, 2 * H), x.new_empty(M, x.size(1))
        for n_e, xs_e, h_e, hg_e, hu_e, o_e, w_in_e, w_out_e in zip(
                rows, xs.split(rows), h.split(rows), h[:, :H].split(rows), h[:, H:].split(rows), o.split(rows),
                w_in.unbind(0), w_out.unbind(0)):
            if n_e == 0:  # nothing to do: generating one token leaves E - K of the experts idle
                continue
            torch.mm(xs_e, w_in_e, out=h_e)                                  # [M_e, 2H], in place in h
            torch.mm(F.silu(hg_e).mul_(hu_e), w_out_e, out=o_e)              # swiglu(h_e) @ w_out[e]
    else:
        h = _gmm(xs, w_in, offs)                                             # [M, 2H]
        o = _gmm(swiglu(h), w_out, offs)                                     # [M, D]
    return x.new_zeros(x.shape).index_add_(0, token, o * g[:, None]), h, o


def experts_backward(dy, x, token, g, h, o, w_in, w_out, offs, expert_major):
    """Backward of experts_forward for upstream dy [N, D]: dx [N, D], dg [M] (the gate of each pair),
    dw_in [E, D, 2H], dw_out [E, H, D]. y_n = sum g * o, so dL/dg = <dy_n, o> and the expert output
    receives g * dy_n."""
    H = w_out.size(1)
    dys = dy.index_select(0, token)                                          # [M, D]
    dg = torch.linalg.vecdot(dys, o)                                         # [M] <dy_n, o>
    do = dys.mul_(g[:, None])                                                # [M, D], in place
    xs = x.index_select(0, token)                                            # [M, D]
    if expert_major:
        rows = _expert_rows(offs)
        dh, dxs = torch.empty_like(h), torch.empty_like(xs)
        dw_in, dw_out = torch.empty_like(w_in), torch.empty_like(w_out)
        for do_e, xs_e, hg_e, hu_e, dh_e, dhg_e, dhu_e, dxs_e, w_in_t, w_out_t, dw_in_e, dw_out_e in zip(
                do.split(rows), xs.split(rows), h[:, :H].split(rows), h[:, H:].split(rows), dh.split(rows),
                dh[:, :H].split(rows), dh[:, H:].split(rows), dxs.split(rows), w_in.transpose(1, 2).unbind(0),
                w_out.transpose(1, 2).unbind(0), dw_in.unbind(0), dw_out.unbind(0)):
            s = F.silu(hg_e)                                                 # [M_e, H], reused by dh
            torch.mm((s * hu_e).t(), do_e, out=dw_out_e)                     # no rows: [H, 0] @ [0, D] = 0
            da = do_e @ w_out_t                                              # [M_e, H]
            # swiglu_backward's two lines, on the views of dh cut before the loop (calling it would add
            # a chunk, an allocation and two slices per expert)
            torch.ops.aten.silu_backward.grad_input(da * hu_e, hg_e, grad_input=dhg_e)
            torch.mul(da, s, out=dhu_e)
            torch.mm(xs_e.t(), dh_e, out=dw_in_e)
            torch.mm(dh_e, w_in_t, out=dxs_e)
    else:
        s = F.silu(h[:, :H])                                                 # [M, H], reused by dh
        dw_out = _gmm_wgrad(s * h[:, H:], do, offs)                          # [E, H, D]
        dh = swiglu_backward(_gmm(do, w_out.transpose(1, 2), offs), h, silu_gate=s)   # [M, 2H]
        dw_in, dxs = _gmm_wgrad(xs, dh, offs), _gmm(dh, w_in.transpose(1, 2), offs)
    return x.new_zeros(x.shape).index_add_(0, token, dxs), dg, dw_in, dw_out
