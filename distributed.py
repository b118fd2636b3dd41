"""
Several processes: process groups, data parallelism (DDP) and expert parallelism (EP).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process it starts; without them this is
a single process and every function here is a no-op, so train.py reads the same either way.
The backend follows the device: NCCL between GPUs, gloo between CPU processes.

Expert parallelism swaps the dispatch, not the routers. With ep_size = P, P consecutive ranks
(an "EP group") share the E experts of every MoE layer, E/P each. Every rank still runs the whole
router on its own tokens; then each (token, expert) pair travels to the rank that owns the expert,
is computed there by the usual backend (experts.moe_ffn), and comes back to be gated and summed:

    rank r:  gates [N, E] -> pairs sorted by expert (so by owner) -> all-to-all -> local experts
             -> all-to-all back (same splits, swapped) -> y_n = sum_e gates[n, e] * out[n, e]

Ranks r and r + P, r + 2P, ... hold the same experts (an "expert-DP group"): they average their
expert gradients, as DDP averages the dense ones over every rank.

Shape legend: N tokens, E experts (E_l = E/P on one rank), D model width, H expert hidden,
M pairs this rank sends, M_recv pairs it receives.
"""

import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from experts import Experts, moe_ffn, resolve_impl
from pairs import routed_pairs


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = 'cpu'
    ep_size: int = 1  # ranks that share one copy of the experts
    ep_group: Any = None  # this rank's EP group (consecutive ranks), None without EP
    expert_dp_group: Any = None  # the ranks holding the same experts as this one
    # what this rank's expert all-to-alls moved and took since take_a2a_stats last read them.
    # Seconds are host time: right for gloo (synchronous); with NCCL the call only enqueues.
    a2a_bytes: int = 0
    a2a_seconds: float = 0.0

    @property
    def master(self):  # the one process that logs and writes checkpoints
        return self.rank == 0

    @property
    def ep_rank(self):  # which slice of the experts this rank owns
        return self.rank % self.ep_size


def check_ep_size(ep_size, world_size, n_expert):
    """A one-line reason why ep_size does not fit, or None. Run before any process group exists."""
    if ep_size < 1:
        return f"ep_size={ep_size} must be a positive integer"
    if world_size % ep_size:
        return f"ep_size={ep_size} must divide the number of processes ({world_size})"
    if n_expert % ep_size:
        return f"ep_size={ep_size} must divide the number of experts ({n_expert})"
    return None


def init(device, ep_size=1, timeout_s=300.0):
    """Join the process group torchrun set up (if any). `device` is 'cpu', 'cuda' or 'cuda:N'.
    A collective that waits longer than timeout_s raises instead of hanging (a dead rank)."""
    if 'RANK' not in os.environ:
        return Dist(device=device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'  # one GPU per process
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo', timeout=timeout)
    d = Dist(rank, local_rank, world_size, device, ep_size)
    if ep_size > 1:
        # every rank must create every group, in the same order, even those it is not part of
        for g in range(world_size // ep_size):  # EP groups: [0..P-1], [P..2P-1], ...
            group = dist.new_group(list(range(g * ep_size, (g + 1) * ep_size)), timeout=timeout)
            if rank // ep_size == g:
                d.ep_group = group
        for j in range(ep_size):  # expert-DP groups: [j, j+P, j+2P, ...]
            group = dist.new_group(list(range(j, world_size, ep_size)), timeout=timeout)
            if rank % ep_size == j:
                d.expert_dp_group = group
    return d


def wrap(model, d):
    """DDP averages gradients over ranks during backward; with one process, the model itself.
    Expert-parallel weights differ from rank to rank by design: DDP must neither broadcast nor
    average them (sync_expert_grads does their part)."""
    if d.world_size == 1:
        return model
    expert_names = [n for n, p in model.named_parameters() if _is_expert_param(model, p)]
    if expert_names:
        DDP._set_params_and_buffers_to_ignore_for_model(model, expert_names)
    return DDP(model, device_ids=[d.local_rank] if d.device.startswith('cuda') else None)


def all_reduce_mean(t, d):
    """The mean of t over ranks (a copy), so every rank takes the same decision from it."""
    if d.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG if d.device.startswith('cuda') else dist.ReduceOp.SUM)
        if not d.device.startswith('cuda'):
            t /= d.world_size  # gloo has no AVG
    return t


def all_reduce_sum(t, d):
    """The sum of t over ranks (a copy): pooled sums and counts, where a mean of means would weigh
    ranks with fewer tokens as much as the others."""
    if d.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d):
    if d.world_size > 1:
        dist.barrier()


def destroy(d):
    # every group must be destroyed before exit, or the interpreter can abort on shutdown
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def exit_on_lost_peer(d):
    """Turn the error a collective raises when another rank died (or timed out) into one line:
    the surviving ranks then exit instead of printing a wall of C++ frames, or hanging."""
    if d.world_size == 1:
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, (dist.DistError, RuntimeError)) and _looks_like_lost_peer(str(value)):
            first = (str(value).strip().splitlines() or [''])[0][:200]
            print(f"error: rank {d.rank}: another process stopped or timed out, exiting ({first})",
                  file=sys.stderr)
            os._exit(3)  # skip destroy_process_group: it would wait for the dead peer
        previous(kind, value, tb)

    sys.excepthook = hook


def _looks_like_lost_peer(message):
    needles = ('Connection closed', 'Connection reset', 'timed out', 'Timed out', 'Broken pipe',
               'NCCL', 'gloo', 'Gloo', 'closed by peer')
    return any(n in message for n in needles)

# -----------------------------------------------------------------------------
# expert parallelism

def take_a2a_stats(d):
    """(bytes, seconds) of this rank's expert all-to-alls since the last call, and a reset."""
    stats = d.a2a_bytes, d.a2a_seconds
    d.a2a_bytes, d.a2a_seconds = 0, 0.0
    return stats


def _exchange(x, out_splits, in_splits, d):
    """all_to_all_single along dim 0 in d's EP group: rows in_splits[p] of x go to rank p, and
    out_splits[p] rows arrive from rank p (in rank order)."""
    x = x.contiguous()
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=d.ep_group)
    d.a2a_seconds += time.perf_counter() - t0
    d.a2a_bytes += (x.numel() + out.numel()) * x.element_size()  # sent + received
    return out


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all. Row i sent to rank p arrives at p; so in the backward the
    gradient of that row must travel from p back here: the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, d):
        ctx.out_splits, ctx.in_splits, ctx.d = out_splits, in_splits, d
        return _exchange(x, out_splits, in_splits, d)

    @staticmethod
    def backward(ctx, dy):
        return _exchange(dy, ctx.in_splits, ctx.out_splits, ctx.d), None, None, None


class ExpertParallelExperts(nn.Module):
    """The E_l = E/P experts this rank owns, with the Experts interface: forward(x [N, D],
    gates [N, E]) -> y [N, D], gates over ALL E experts, as the router made them."""

    def __init__(self, full: Experts, d: Dist):
        super().__init__()
        E = full.w_in.size(0)
        self.impl, self.d, self.group, self.ep_size, self.n_expert = full.impl, d, d.ep_group, d.ep_size, E
        self.n_local = E // d.ep_size
        lo = d.ep_rank * self.n_local
        # own copies of this rank's slice, so the full tensors can be freed
        self.w_in = nn.Parameter(full.w_in.detach()[lo:lo + self.n_local].clone())    # [E_l, D, 2H]
        self.w_out = nn.Parameter(full.w_out.detach()[lo:lo + self.n_local].clone())  # [E_l, H, D]

    def forward(self, x, gates, sums=False, decode=False):
        # decode is ignored: every rank must join the exchange, whatever the number of tokens
        P, E_l = self.ep_size, self.n_local
        # 1. the active pairs, sorted by expert and so by owner rank (expert // E_l), then token
        (expert, token), send_counts = routed_pairs(gates)                      # [M], [M], [E] = [P * E_l]
        # 2. counts per expert, exchanged: rank p learns how many rows each rank sends each of
        # its experts. The split sizes must be known on the host: this is the step's sync point.
        recv_counts = torch.empty_like(send_counts)                             # [P (source), E_l]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.view(P, E_l).sum(1).tolist()
        recv_splits = recv_counts.view(P, E_l).sum(1).tolist()
        # 3. dispatch: one row per pair (a token using two experts of one rank goes twice)
        x_recv = AllToAll.apply(x[token], recv_splits, send_splits, self.d)  # [M_recv, D]
        # rows arrive grouped by source, each source's rows sorted by expert: the counts say which
        local_expert = torch.repeat_interleave(
            torch.arange(E_l, device=x.device).repeat(P), recv_counts)          # [M_recv]
        # 4. the usual backend on a gate matrix with one 1 per row: plain FFN_e(x_row). The real
        # gates are applied at home in step 6, so their gradient never has to travel.
        ones = F.one_hot(local_expert, E_l).to(x.dtype)                          # [M_recv, E_l]
        out = moe_ffn(x_recv, ones, self.w_in, self.w_out, resolve_impl(self.impl, x.device.type))
        # 5. the outputs go back: the same exchange, splits swapped; rows return in pair order
        out = AllToAll.apply(out, send_splits, recv_splits, self.d)              # [M, D]
        # 6. combine: y_n = sum_e gates[n, e] * FFN_e(x_n); dL/dgates[n, e] = <dy_n, FFN_e(x_n)>
        gated = gates[token, expert].unsqueeze(1) * out                          # [M, D]
        y = torch.zeros_like(x).index_add_(0, token, gated.to(x.dtype))
        if not sums:
            return y
        # Default MoE's EMA: each expert's output summed over this rank's tokens, as Experts gives it
        expert_sums = out.new_zeros(self.n_expert, out.size(1), dtype=torch.float32)
        return y, expert_sums.index_add_(0, expert, out.detach().float())       # [E, D]

    def extra_repr(self):
        E_l, D, H2 = self.w_in.shape
        return f'n_local={E_l} of {self.n_expert}, n_embd={D}, hidden={H2 // 2}, impl={self.impl!r}'


def _ep_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]


def _is_expert_param(model, p):
    return any(p is q for _, m in _ep_modules(model) for q in (m.w_in, m.w_out))


def expert_params(model):
    return [q for _, m in _ep_modules(model) for q in (m.w_in, m.w_out)]


def apply_expert_parallel(model, d):
    """Swap every Experts module for this rank's ExpertParallelExperts slice (in place, same
    position, so parameter order and state_dict keys are unchanged). Call after the full model is
    built or loaded and before DDP. No-op unless ep_size > 1."""
    if d.ep_size == 1:
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, Experts):
            for w in (module.w_in, module.w_out):  # rank 0's init (seeds differ per rank)
                dist.broadcast(w.data, src=0)
            parent, _, attr = name.rpartition('.')
            setattr(model.get_submodule(parent), attr, ExpertParallelExperts(module, d))
    return model


def sync_expert_grads(model, d):
    """After backward, before clipping: make expert gradients the mean over all ranks' losses,
    as DDP does for dense ones. The all-to-all already brought every rank of the EP group to the
    owner, so the owner holds the SUM over its EP group; summing over the expert-DP group covers
    every rank; dividing by world_size makes it DDP's mean."""
    for p in expert_params(model):
        if p.grad is None:
            continue
        if d.world_size > d.ep_size:
            dist.all_reduce(p.grad, group=d.expert_dp_group)
        p.grad.div_(d.world_size)


def clip_grad_norm_(model, max_norm, d):
    """torch.nn.utils.clip_grad_norm_ over the whole model, with the expert slices' squares
    summed over the EP group so every rank sees the norm of the full gradient. Returns that norm
    (a 0-d tensor); max_norm=0 only measures it."""
    experts = expert_params(model)
    if not experts:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if max_norm == 0:
            return torch.nn.utils.get_total_norm(grads)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    ids = {id(p) for p in experts}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in ids]
    sq = lambda gs: sum((g.float().square().sum() for g in gs), torch.zeros((), device=grads[0].device))
    expert_sq = sq(p.grad for p in experts if p.grad is not None)
    dist.all_reduce(expert_sq, group=d.ep_group)
    total = (sq(dense) + expert_sq).sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total

# -----------------------------------------------------------------------------
# checkpoints: always the full model, whatever ep_size wrote or reads them


def _gather_experts(t, d):
    """[E_l, ...] slices of the EP group -> [E, ...] in expert order (every rank gets it)."""
    parts = [torch.empty_like(t) for _ in range(d.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=d.ep_group)
    return torch.cat(parts)


def full_state_dict(model, d):
    """The single-process model's state_dict, expert slices gathered. Collective: every rank calls."""
    sd = model.state_dict()
    for name, m in _ep_modules(model):
        for w in ('w_in', 'w_out'):
            sd[f'{name}.{w}'] = _gather_experts(getattr(m, w).detach(), d)
    return sd


def full_model(model, d):
    """Rank 0's copy of the whole model, for work one process does alone (the sample at the end of
    training); None on the other ranks. Without expert parallelism it is the model itself; with it,
    every rank takes part in gathering the experts and only rank 0 builds the copy."""
    if d.ep_size == 1:
        return model if d.master else None
    state = full_state_dict(model, d)
    if not d.master:
        return None
    full = type(model)(model.config).to(d.device)  # the same class and config, every expert in place
    full.load_state_dict(state)
    return full


def _expert_state_index(optimizer, model):
    """{index in optimizer.state_dict()['state']: the expert parameter} for this rank's slices."""
    order = [p for g in optimizer.param_groups for p in g['params']]
    ids = {id(p) for p in expert_params(model)}
    return {i: p for i, p in enumerate(order) if id(p) in ids}


def full_optimizer_state(optimizer, model, d):
    """optimizer.state_dict() with the expert slices' moments gathered. Collective."""
    sd = optimizer.state_dict()
    for i, p in _expert_state_index(optimizer, model).items():
        if i in sd['state']:  # copy the dict: state_dict() shares it with the live optimizer
            sd['state'][i] = {k: _gather_experts(v, d) if torch.is_tensor(v) and v.shape == p.shape else v
                              for k, v in sd['state'][i].items()}
    return sd


def shard_optimizer_state(sd, optimizer, model, d):
    """The inverse for loading: keep this rank's slice of every full expert moment."""
    for i, p in _expert_state_index(optimizer, model).items():
        if i in sd['state']:
            lo = d.ep_rank * p.size(0)
            sd['state'][i] = {k: v[lo:lo + p.size(0)].clone() if torch.is_tensor(v) and v.dim() == p.dim()
                              else v for k, v in sd['state'][i].items()}
    return sd
