"""
Triton kernels for the expert FFN over routed tokens, scatter-style (ScatterMoE, arXiv 2403.08245),
and their launchers: tensors in, tensors out. This module imports only torch and triton; the
torch.library ops that run these launchers as the triton backend, with autograd, so that
torch.compile(fullgraph=True) traces the model without a break, are in experts.py.

Shape legend, as in experts.py: N tokens, E experts, K active per token, D model width, H expert
hidden, M active (token, expert) pairs. The GEMM helpers are generic: [M, Q] @ [E, Q, P] -> [M, P].

The pairs are listed by expert (then token), so each expert owns one contiguous run of "pair rows".
Nothing is ever copied into that order: the GEMM kernels read the token rows of x (or dy) through
the pair -> token index, and the combine sums a token's rows back in a fixed order. The triton
backend (experts.triton_ffn and its backward) composes them as

    forward:   h   = x[token] @ w_in[e]              grouped_gemm, gathers x rows in the kernel
               a   = swiglu(h)                        torch, elementwise
               o   = gate * (a @ w_out[e])            grouped_gemm, gate multiplied in the epilogue
               y_n = sum of o over token n's pairs    combine: fixed order, no atomics
    backward:  da' = dy[token] @ w_out[e]^T           dgate = <da', a> and da = gate * da'
               dh  = swiglu'(da)                      torch, elementwise
               dxs = dh @ w_in[e]^T, dx = combine(dxs)
               dw_out[e] = a^T @ (gate * dy[token]), dw_in[e] = x[token]^T @ dh   grouped_wgrad

The ungated expert output o is never stored: the gate gradient <dy_n, a @ w_out[e]> is computed as
<dy_n @ w_out[e]^T, a>, which the backward needs anyway. Saved for backward: h [M, 2H] only.

TRITON_INTERPRET=1 must be set before this module is imported (triton reads it when @triton.jit
decorates); the kernels then run on CPU tensors, slowly, which is what the tests do.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
_UPCAST_DOT = tl.constexpr(INTERPRET)  # see _dot


def _pick(configs):
    """Autotuning benchmarks every config on the first call: under the interpreter that costs
    minutes and measures nothing, so it gets the first (smallest) config only."""
    return configs[:1] if INTERPRET else configs

# -----------------------------------------------------------------------------
# kernels


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. Triton 3.9's interpreter multiplies bf16 tiles as their
    raw 16-bit patterns (garbage), so under the interpreter the tiles are upcast first."""
    if _UPCAST_DOT:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def _gemm_configs():
    # a short list, good on A100/H100 for the widths of this repo (D, H in 128..4096)
    c = lambda m, n, k, w, s: triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
    return _pick([c(32, 32, 32, 4, 2), c(64, 64, 32, 4, 3), c(128, 64, 32, 4, 4), c(64, 128, 32, 4, 4),
                  c(128, 128, 32, 8, 3)])


@triton.autotune(configs=_gemm_configs(), key=['Q', 'P'])
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, stride_am, stride_aq,              # A [*, Q]: the rows are read through a_row
    a_row_ptr,                                # [M] row of A for each pair (the gather)
    b_ptr, stride_be, stride_bq, stride_bp,   # B [E, Q, P]: one matrix per expert
    scale_ptr,                                # [M] multiplies each output row (the gate)
    c_ptr, stride_cm, stride_cp,              # C [M, P], pair rows, grouped by expert
    ends_ptr,                                 # [E] end of each expert's run of pair rows
    E, Q, P,
    PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # Each expert's run is cut into tiles of BLOCK_M rows, so a tile never mixes experts. Counting
    # the tiles expert by expert (a cumsum over E) tells which expert's tile program pid_m is.
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(ends_ptr + e, mask=e < E, other=0)
    starts = tl.load(ends_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
    tiles = tl.cdiv(ends - starts, BLOCK_M)                   # experts past E have 0 tiles
    last_tile = tl.cumsum(tiles, 0)                           # one past each expert's last tile
    expert = tl.sum((last_tile <= pid_m).to(tl.int32), 0)   # experts entirely before this tile
    if expert >= E:  # the grid is an upper bound on the tile count; the surplus has no work
        return
    this = e == expert
    tile = pid_m - tl.sum(tl.where(this, last_tile - tiles, 0), 0)
    rows = tl.sum(tl.where(this, starts, 0), 0) + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.sum(tl.where(this, ends, 0), 0)
    a_rows = tl.load(a_row_ptr + rows, mask=row_ok, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < P
    b_ptr += expert.to(tl.int64) * stride_be

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Q, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < Q
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_aq,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bq + cols[None, :] * stride_bp,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # weights may be fp32 parameters under bf16 autocast: cast the tile, not a copy of w
        acc = _dot(a, b.to(a.dtype), acc, PRECISION)
    acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cp,
             acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _wgrad_configs():
    c = lambda q, p, m, w, s: triton.Config(dict(BLOCK_Q=q, BLOCK_P=p, BLOCK_M=m), num_warps=w, num_stages=s)
    return _pick([c(32, 32, 32, 4, 2), c(64, 64, 32, 4, 3), c(128, 64, 32, 4, 4), c(128, 128, 32, 8, 3)])


@triton.autotune(configs=_wgrad_configs(), key=['Q', 'P'])
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, stride_am, stride_aq, a_row_ptr,   # A [*, Q], rows read through a_row [M]
    b_ptr, stride_bm, stride_bp, b_row_ptr,   # B [*, P], rows read through b_row [M]
    scale_ptr,                                # [M] multiplies each row of B
    c_ptr, stride_ce, stride_cq, stride_cp,   # C [E, Q, P]
    ends_ptr,                                 # [E] end of each expert's run of pair rows
    Q, P,
    PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # one program = one [BLOCK_Q, BLOCK_P] tile of one expert's weight gradient, summed over the
    # expert's pair rows in order: deterministic, and an expert with no rows writes zeros
    expert = tl.program_id(0)
    n_p = tl.cdiv(P, BLOCK_P)
    qs = (tl.program_id(1) // n_p) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ps = (tl.program_id(1) % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(ends_ptr + expert)

    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_rows = tl.load(a_row_ptr + rows, mask=row_ok, other=0)
        b_rows = tl.load(b_row_ptr + rows, mask=row_ok, other=0)
        at = tl.load(a_ptr + a_rows[None, :] * stride_am + qs[:, None] * stride_aq,   # A^T tile
                     mask=row_ok[None, :] & (qs[:, None] < Q), other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + ps[None, :] * stride_bp,
                    mask=row_ok[:, None] & (ps[None, :] < P), other=0.0)
        s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        b = (b.to(tl.float32) * s[:, None]).to(at.dtype)
        acc = _dot(at, b, acc, PRECISION)
    tl.store(c_ptr + expert.to(tl.int64) * stride_ce + qs[:, None] * stride_cq + ps[None, :] * stride_cp,
             acc.to(c_ptr.dtype.element_ty), mask=(qs[:, None] < Q) & (ps[None, :] < P))


def _combine_configs():
    return _pick([triton.Config(dict(BLOCK_D=d), num_warps=w) for d, w in ((64, 2), (128, 4), (256, 4))])


@triton.autotune(configs=_combine_configs(), key=['D'])
@triton.jit
def _combine_kernel(
    r_ptr, stride_rm, stride_rd,   # R [M, D] pair rows
    order_ptr,                     # [M] pair ids sorted by token (then expert)
    starts_ptr,                    # [N + 1] token n's pairs are order[starts[n]:starts[n + 1]]
    y_ptr, stride_yn, stride_yd,   # Y [N, D]
    D, BLOCK_D: tl.constexpr,
):
    # one program = one token and BLOCK_D columns; its rows are summed in a fixed order (expert
    # order), so the result is bitwise reproducible. No pairs: the loop is empty and y_n = 0.
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(tl.load(starts_ptr + n), tl.load(starts_ptr + n + 1)):
        pair = tl.load(order_ptr + i)
        acc += tl.load(r_ptr + pair * stride_rm + cols * stride_rd, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + n.to(tl.int64) * stride_yn + cols * stride_yd, acc.to(y_ptr.dtype.element_ty), mask=col_ok)

# -----------------------------------------------------------------------------
# launchers


def _precision(a):
    # fp32 follows torch's TF32 switch, as torch.matmul does; bf16/fp16 inputs always use tensor cores
    return 'tf32' if a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else 'ieee'


def grouped_gemm(a, a_row, b, ends, scale=None):
    """C [M, P] with C[m] = scale[m] * (a[a_row[m]] @ b[e]) for every pair row m of expert e.

        a      [*, Q]     any rows; pair m reads row a_row[m]       (x, or dy: no permuted copy)
        a_row  [M] int    pair rows grouped by expert:  | e=0 rows | e=1 rows | ... | e=E-1 rows |
        b      [E, Q, P]  any strides (w_in, or w_out.transpose(1, 2) for a backward)
        ends   [E] int    ends[e] = one past the last pair row of expert e (a cumsum of counts)
        scale  [M]        per pair row, applied to the fp32 accumulator (the gate); None = 1
    C has a's dtype; accumulation is fp32."""
    M, (E, Q, P) = a_row.numel(), b.shape
    assert a.dim() == 2 and a.size(1) == Q and ends.numel() == E, (a.shape, b.shape, ends.shape)
    c = a.new_empty(M, P)
    if M == 0:
        return c
    a_row, ends = a_row.contiguous(), ends.contiguous()   # the kernel indexes them as flat arrays
    scale = a.new_ones(M, dtype=torch.float32) if scale is None else scale.contiguous()
    # at most cdiv(M, BLOCK_M) full tiles plus one partial tile per expert
    grid = lambda meta: (triton.cdiv(M, meta['BLOCK_M']) + E, triton.cdiv(P, meta['BLOCK_N']))
    _grouped_gemm_kernel[grid](
        a, a.stride(0), a.stride(1), a_row,
        b, b.stride(0), b.stride(1), b.stride(2),
        scale, c, c.stride(0), c.stride(1), ends,
        E, Q, P, PRECISION=_precision(a), BLOCK_E=triton.next_power_of_2(E))
    return c


def grouped_wgrad(a, a_row, b, b_row, ends, E, scale=None, out_dtype=None):
    """C [E, Q, P] with C[e] = sum over pair rows m of expert e of a[a_row[m]]^T (scale[m] * b[b_row[m]]).

        a      [*, Q]   read through a_row [M]   (x[token] for dw_in, a for dw_out)
        b      [*, P]   read through b_row [M]   (dh for dw_in, dy[token] for dw_out)
        ends   [E]      as in grouped_gemm; an expert without rows gets a zero gradient
        scale  [M]      multiplies the rows of b (the gate); None = 1
    Each expert's rows are summed in order by one program per output tile: no atomics."""
    M, Q, P = a_row.numel(), a.size(1), b.size(1)
    assert b_row.numel() == M and ends.numel() == E
    c = a.new_empty(E, Q, P, dtype=out_dtype or a.dtype)
    a_row, b_row, ends = a_row.contiguous(), b_row.contiguous(), ends.contiguous()
    scale = a.new_ones(M, dtype=torch.float32) if scale is None else scale.contiguous()
    grid = lambda meta: (E, triton.cdiv(Q, meta['BLOCK_Q']) * triton.cdiv(P, meta['BLOCK_P']))
    _grouped_wgrad_kernel[grid](
        a, a.stride(0), a.stride(1), a_row,
        b, b.stride(0), b.stride(1), b_row,
        scale, c, c.stride(0), c.stride(1), c.stride(2), ends,
        Q, P, PRECISION=_precision(a))
    return c


def combine(rows, order, starts, N):
    """Y [N, D] with Y[n] = sum of rows[order[i]] for i in starts[n]:starts[n+1], in that order.

        rows    [M, D]     pair rows, grouped by expert
        order   [M] int    pair ids sorted by token:  | token 0's pairs | token 1's pairs | ...
        starts  [N + 1]    CSR offsets into order; a token with no pair gets an exact 0 row
    """
    D = rows.size(1)
    y = rows.new_empty(N, D)
    if N == 0:
        return y
    grid = lambda meta: (N, triton.cdiv(D, meta['BLOCK_D']))
    _combine_kernel[grid](rows, rows.stride(0), rows.stride(1), order, starts,
                          y, y.stride(0), y.stride(1), D)
    return y
