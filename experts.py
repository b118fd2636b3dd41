"""
Expert weights and the backends that run them: the consumer side of the one contract

    moe_ffn(x[N, D], gates[N, E], w_in, w_out) -> y[N, D],   y_n = sum_e gates[n, e] * FFN_e(x_n)

Shape legend, used in every comment below:
    N tokens (B*T flattened), E experts, K active experts per token, D model width (n_embd),
    H expert hidden size, M = number of active (token, expert) pairs = count of non-zeros in gates,
    M_e = the pairs of expert e.

gates is dense with zeros for inactive experts. A row may hold any number of non-zeros (top-k: K,
ReLU routing: anything from 0 to E), so M is data-dependent. An expert is never computed for a token
whose gate is zero, so the gradient of a zero gate is exactly 0: zero means "not selected".

Backends (all compute the same function, selected by the expert_impl string):
    loop:    one matmul per expert over the tokens it was given. The readable reference.
    grouped: list the pairs by expert, one F.grouped_mm per weight (on CPU, expert by expert:
             each expert's whole FFN while its rows are in cache), weighted scatter-add back: the
             arithmetic of pairs.py, forward and backward by hand. Wrapped here as torch.library
             custom ops so torch.compile(fullgraph=True) sees no data-dependent shapes.
    triton:  the kernels of kernels.py: the GEMMs gather token rows inside the kernel (no permuted
             copy of x), the gate is applied in the GEMM's epilogue and each token's rows are
             summed in a fixed order (deterministic, no atomics). Registered here as custom ops of
             the same shape as grouped's. CUDA only, or CPU under TRITON_INTERPRET=1 (the tests).

experts.py imports pairs.py, and kernels.py lazily at the triton backend's first call; never the reverse.
"""

import importlib.util
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pairs import experts_backward, experts_forward, flat_pairs, routed_pairs, swiglu, swiglu_backward

EXPERT_IMPLS = ('loop', 'grouped', 'triton', 'auto')
_HAS_TRITON = importlib.util.find_spec('triton') is not None  # not on macOS or Windows


def check_impl(impl: str):
    """The one check of an expert_impl name (GPTConfig.validate and Experts use it)."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl={impl!r} is not one of {', '.join(EXPERT_IMPLS)}")


def resolve_impl(impl: str, device_type: str) -> str:
    """Turn the expert_impl config string into the backend that runs on device_type."""
    check_impl(impl)
    if impl == 'auto':
        return 'triton' if device_type == 'cuda' and _HAS_TRITON else 'grouped'
    if impl == 'triton':
        if not _HAS_TRITON:
            raise ValueError("expert_impl='triton' needs the triton package (Linux): use 'grouped'")
        # the interpreter runs each kernel program in Python: right for tests, hopeless for training
        if device_type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
            raise ValueError(f"expert_impl='triton' needs a CUDA device, not {device_type} (on CPU the "
                             f"kernels only run under TRITON_INTERPRET=1, far too slow to train): use 'grouped'")
    return impl

# -----------------------------------------------------------------------------
# loop: the reference


def _loop_ffn(x, gates, w_in, w_out):
    """One gather -> FFN -> weighted scatter per expert; plain autograd does the backward.
    Eager only: nonzero() gives each expert a data-dependent token count, which
    torch.compile(fullgraph=True) cannot trace. Use 'grouped' under compile.
    Also returns each expert's output summed over its tokens, [E, D] fp32, without gradient."""
    y = torch.zeros_like(x)                                  # [N, D]
    sums = []
    for e in range(gates.size(1)):
        token = gates[:, e].nonzero().squeeze(1)             # [M_e] tokens routed to expert e
        h = x[token] @ w_in[e]                               # [M_e, 2H]
        o = swiglu(h) @ w_out[e]                             # [M_e, D]
        # gathering only the active gates is what makes an inactive gate's gradient exactly 0
        y.index_add_(0, token, (gates[token, e, None] * o).to(y.dtype))
        sums.append(o.detach().float().sum(0))               # [D]
    return y, torch.stack(sums)



def decode_ffn(x, gates, w_in, w_out):
    """The generation step's path (eager, CPU): the same sum over the few active (token, expert)
    pairs of one new position per sequence, one pair at a time on views of the weights: for one token
    and K experts, K matrix-vector products and six ops a pair. The gates come to Python in one
    transfer (a few rows of E numbers), so choosing the pairs costs no op at all. The grouped
    backend's fixed cost per call (the sort, the per-expert splits) is ~3x that at N = 1; from dozens
    of tokens on (a prompt's prefill, a training batch) the backends win. Forward only: the gates
    enter as numbers, so they get no gradient (generation runs under inference_mode)."""
    y = torch.zeros_like(x)                                  # [N, D]
    for x_n, y_n, row in zip(x.unbind(0), y.unbind(0), gates.tolist()):   # views of each token's rows
        for e, g_ne in enumerate(row):
            if g_ne != 0:                                    # zero means "not selected"
                y_n.add_(swiglu(x_n @ w_in[e]) @ w_out[e], alpha=g_ne)      # [D] <- [H] <- [2H] <- [D]
    return y


@torch.library.custom_op('moe::decode_ffn', mutates_args=())
def decode_ffn_op(x: Tensor, gates: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """decode_ffn inside a compiled generation step: one opaque op with a static [N, D] output, so the
    step stays one graph of fixed shapes (its Python loop, traced, would break the graph and
    recompile on every gate value). Eager code calls decode_ffn itself (no dispatch, no import of
    torch._dynamo at start-up)."""
    return decode_ffn(x, gates, w_in, w_out)


@decode_ffn_op.register_fake
def _(x, gates, w_in, w_out):
    return torch.empty_like(x)

# -----------------------------------------------------------------------------
# grouped: pairs.py's arithmetic as registered custom ops


def register_ffn_autograd(forward_op, backward_op):
    """The autograd glue of the custom-op backends (grouped, triton): forward_op returns y and then
    the intermediates its backward needs (never handed out, so not differentiable);
    backward_op(dy, *inputs, *intermediates) returns the gradients of x, gates, w_in and w_out."""
    def setup_context(ctx, inputs, output):
        # the intermediates get no gradient; left to itself, eager autograd would hand the backward
        # a zero tensor for each ([M, 2H] and [M, D]: about 1 ms a layer at N 2048, D 128)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*inputs, *output[1:])

    def backward(ctx, dy, *_):
        return backward_op(dy.contiguous(), *ctx.saved_tensors)
    forward_op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op('moe::grouped_ffn', mutates_args=())
def grouped_ffn(x: Tensor, gates: Tensor, w_in: Tensor, w_out: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the grouped backend. Computes in x's dtype.
    in:  x [N, D], gates [N, E] (zero = inactive), w_in [E, D, 2H], w_out [E, H, D]
    out: y [N, D], and what the backward needs:
         pairs [2, M] (see routed_pairs), offs [E] int32 end of each expert's run of pairs,
         h [M, 2H] pre-activation, o [M, D] expert output before the gate."""
    return _grouped_forward(x, gates, w_in, w_out)


def _grouped_forward(x, gates, w_in, w_out):
    """moe::grouped_ffn's body, which eager inference calls directly (moe_ffn)."""
    pairs, counts = routed_pairs(gates)
    offs = counts.cumsum(0).to(torch.int32)                                  # [E]
    expert, token = pairs                                                    # [M], [M]
    g = gates.reshape(-1).index_select(0, flat_pairs(gates, expert, token)).to(x.dtype)  # [M]
    y, h, o = experts_forward(x, token, g, w_in.to(x.dtype), w_out.to(x.dtype), offs,
                               expert_major=x.device.type == 'cpu')          # [N, D], [M, 2H], [M, D]
    return y, pairs, offs, h, o


@grouped_ffn.register_fake
def _(x, gates, w_in, w_out):
    # M is only known at run time: an unbacked size, so no guard on it and no recompilation
    M = torch.library.get_ctx().new_dynamic_size()
    D, H2 = x.size(1), w_in.size(2)
    return (x.new_empty(x.shape), x.new_empty(2, M, dtype=torch.long),
            x.new_empty(gates.size(1), dtype=torch.int32), x.new_empty(M, H2), x.new_empty(M, D))


@torch.library.custom_op('moe::grouped_ffn_backward', mutates_args=())
def grouped_ffn_backward(dy: Tensor, x: Tensor, gates: Tensor, w_in: Tensor, w_out: Tensor,
                         pairs: Tensor, offs: Tensor, h: Tensor, o: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of moe::grouped_ffn. dy [N, D]; the rest are its inputs and outputs, same layouts.
    Returns dx [N, D], dgates [N, E] (zero on inactive entries), dw_in [E, D, 2H], dw_out [E, H, D]."""
    expert, token = pairs                                                    # [M], [M]
    flat = flat_pairs(gates, expert, token)                                  # [M]
    g = gates.reshape(-1).index_select(0, flat).to(x.dtype)                  # [M]
    dx, dg, dw_in, dw_out = experts_backward(dy, x, token, g, h, o, w_in.to(x.dtype), w_out.to(x.dtype), offs,
                                              expert_major=x.device.type == 'cpu')
    dgates = gates.new_zeros(gates.numel()).index_copy_(0, flat, dg.to(gates.dtype)).view(gates.shape)  # [N, E]
    return dx, dgates, dw_in.to(w_in.dtype), dw_out.to(w_out.dtype)


@grouped_ffn_backward.register_fake
def _(dy, x, gates, w_in, w_out, pairs, offs, h, o):
    # fresh contiguous tensors, exactly what the real kernel returns
    return (x.new_empty(x.shape), gates.new_empty(gates.shape),
            w_in.new_empty(w_in.shape), w_out.new_empty(w_out.shape))


register_ffn_autograd(grouped_ffn, grouped_ffn_backward)

# -----------------------------------------------------------------------------
# triton: kernels.py's launchers (their plan is in its docstring), as registered custom ops


def _kernels():
    """kernels.py, imported on first use: it needs triton, and TRITON_INTERPRET must be set before
    its import; a machine without triton never gets here (resolve_impl says why)."""
    import kernels
    return kernels


def triton_routing(gates):
    """Index lists for the active pairs. pairs [2, M]: expert ids and token ids, by expert then token
    (routed_pairs); ends [E] one past each expert's last pair; order [M] the pair ids sorted by
    token, then expert; starts [N + 1] the offsets of each token's pairs in order."""
    N = gates.size(0)
    pairs, counts = routed_pairs(gates)
    ends = counts.cumsum(0)
    order = torch.argsort(pairs[1], stable=True)     # stable: a token's pairs stay in expert order
    starts = F.pad(torch.bincount(pairs[1], minlength=N).cumsum(0), (1, 0))
    return pairs, ends, order, starts


@torch.library.custom_op('moe::triton_ffn', mutates_args=())
def triton_ffn(x: Tensor, gates: Tensor, w_in: Tensor, w_out: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of the triton backend; computes in x's dtype, accumulates in fp32.
    in:  x [N, D], gates [N, E] (zero = inactive), w_in [E, D, 2H], w_out [E, H, D]
    out: y [N, D], and for the backward: pairs [2, M], ends [E], order [M], starts [N + 1]
         (see triton_routing) and the pre-activation h [M, 2H]."""
    k = _kernels()
    pairs, ends, order, starts = triton_routing(gates)
    expert, token = pairs.unbind(0)
    g = gates[token, expert].float()                                     # [M]
    h = k.grouped_gemm(x, token, w_in, ends)                             # [M, 2H]
    o = k.grouped_gemm(swiglu(h), torch.arange(len(token), device=x.device), w_out, ends, g)  # [M, D]
    return k.combine(o, order, starts, x.size(0)), pairs, ends, order, starts, h


@triton_ffn.register_fake
def _(x, gates, w_in, w_out):
    M = torch.library.get_ctx().new_dynamic_size()  # data-dependent: no guard, no recompilation
    N, E = gates.shape
    long = dict(dtype=torch.long)
    return (x.new_empty(x.shape), x.new_empty(2, M, **long), x.new_empty(E, **long), x.new_empty(M, **long),
            x.new_empty(N + 1, **long), x.new_empty(M, w_in.size(2)))


@torch.library.custom_op('moe::triton_ffn_backward', mutates_args=())
def triton_ffn_backward(dy: Tensor, x: Tensor, gates: Tensor, w_in: Tensor, w_out: Tensor, pairs: Tensor,
                        ends: Tensor, order: Tensor, starts: Tensor, h: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of moe::triton_ffn. Returns dx [N, D], dgates [N, E] (zero on inactive entries),
    dw_in [E, D, 2H] and dw_out [E, H, D] in the dtypes of x, gates, w_in and w_out."""
    k = _kernels()
    expert, token = pairs.unbind(0)
    E, M = w_in.size(0), len(token)
    rows = torch.arange(M, device=x.device)                              # identity: already pair rows
    g = gates[token, expert].float()                                     # [M]
    a = swiglu(h)                                                        # [M, H] recomputed, not saved
    da_raw = k.grouped_gemm(dy, token, w_out.transpose(1, 2), ends)      # [M, H] = dy_n @ w_out[e]^T
    dg = (da_raw.float() * a.float()).sum(1)                             # [M] = <dy_n, a @ w_out[e]>
    da = da_raw * g[:, None].to(da_raw.dtype)                            # [M, H]
    dh = swiglu_backward(da, h)                                          # [M, 2H]
    dw_out = k.grouped_wgrad(a, rows, dy, token, ends, E, scale=g, out_dtype=w_out.dtype)   # [E, H, D]
    dw_in = k.grouped_wgrad(x, token, dh, rows, ends, E, out_dtype=w_in.dtype)              # [E, D, 2H]
    dx = k.combine(k.grouped_gemm(dh, rows, w_in.transpose(1, 2), ends), order, starts, x.size(0))  # [N, D]
    dgates = gates.new_zeros(gates.shape).index_put_((token, expert), dg.to(gates.dtype))        # [N, E]
    return dx, dgates, dw_in, dw_out


@triton_ffn_backward.register_fake
def _(dy, x, gates, w_in, w_out, pairs, ends, order, starts, h):
    return x.new_empty(x.shape), gates.new_empty(gates.shape), w_in.new_empty(w_in.shape), w_out.new_empty(w_out.shape)


register_ffn_autograd(triton_ffn, triton_ffn_backward)

# -----------------------------------------------------------------------------


def expert_output_sums(expert, h, w_out):
    """sum_{pairs of e} FFN_e(x_n) for every expert e: [E, D] in fp32, outside autograd (Default MoE's
    EMA, routers.py). From what the custom ops already hand out, pairs' experts [M] and h [M, 2H]: the
    output projection is linear, so an expert's summed output is its summed activations swiglu(h)
    times w_out[e]. Nothing the experts compute changes, and no [M, D] pass is added."""
    a = swiglu(h.detach()).float()                                           # [M, H]
    per_expert = a.new_zeros(w_out.size(0), a.size(1)).index_add_(0, expert, a)  # [E, H]
    return torch.bmm(per_expert[:, None], w_out.detach().float())[:, 0]      # [E, D]


def moe_ffn(x, gates, w_in, w_out, impl: str, sums: bool = False):
    """y [N, D] = sum_e gates[:, e] * FFN_e(x), x [N, D], gates [N, E], w_in [E, D, 2H], w_out [E, H, D].
    impl is a resolved backend name ('loop', 'grouped' or 'triton'), see resolve_impl.
    sums=True: (y, [E, D]) with each expert's output summed over its tokens, fp32, no gradient."""
    if impl == 'loop':
        y, expert_sums = _loop_ffn(x, gates, w_in, w_out)
        return (y, expert_sums) if sums else y
    if impl in ('grouped', 'triton'):
        # Why a custom op: the pair count M depends on the routing, and torch.compile can't trace
        # grouped_mm's fp32 fake kernel (its meta accepts bf16 only) nor take new shapes every step
        # without recompiling. Hidden inside one op with a static [N, D] output, the model compiles
        # once with fullgraph=True. Autocast does not reach inside custom ops, so apply it here.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        op = grouped_ffn if impl == 'grouped' else triton_ffn
        if impl == 'grouped' and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # eager inference (evaluation, a prompt's prefill) needs neither the op's autograd nor its
            # tracing: its body, without the custom op's dispatch (whose first call imports torch._dynamo,
            # ~1.5 s of a sample.py start-up)
            op = _grouped_forward
        out = op(x, gates, w_in, w_out)
        y, pairs, h = out[0], out[1], out[3 if impl == 'grouped' else 5]
        return (y, expert_output_sums(pairs[0], h, w_out)) if sums else y
    raise ValueError(f"moe_ffn impl={impl!r} is not a resolved backend (loop, grouped, triton)")


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights, so the grouped backend runs each weight in one call."""

    def __init__(self, n_expert: int, n_embd: int, hidden: int, impl: str = 'auto', init_std: float = 0.02):
        super().__init__()
        check_impl(impl)  # fail fast on a typo; the real choice waits for forward's device
        self.impl = impl
        # gate and up projections fused: columns [:H] feed silu, [H:] are the linear "up" branch
        self.w_in = nn.Parameter(torch.empty(n_expert, n_embd, 2 * hidden))   # [E, D, 2H]
        self.w_out = nn.Parameter(torch.empty(n_expert, hidden, n_embd))      # [E, H, D]
        nn.init.normal_(self.w_in, mean=0.0, std=init_std)
        nn.init.normal_(self.w_out, mean=0.0, std=init_std)  # GPT scales it down: it writes the residual

    def forward(self, x, gates, sums=False, decode=False):
        """x [N, D], gates [N, E] -> y [N, D] (sums=True: and each expert's summed output [E, D]).
        decode=True: the few tokens of a generation step, pair by pair (decode_ffn), whatever the backend."""
        if decode:
            return (decode_ffn_op if torch.compiler.is_compiling() else decode_ffn)(x, gates, self.w_in, self.w_out)
        return moe_ffn(x, gates, self.w_in, self.w_out, resolve_impl(self.impl, x.device.type), sums)

    def extra_repr(self):
        E, D, H2 = self.w_in.shape
        return f'n_expert={E}, n_embd={D}, hidden={H2 // 2}, impl={self.impl!r}'
