"""
The softmax routers: top-k (GShard, Switch) and expert prototyping (M6-T), registered in
routers.ROUTERS, and what they share (SoftmaxRouter): a softmax or DeepSeek-V3's sigmoid scores,
the choice of experts, how their load is balanced (`balance`: 'aux' the Switch loss, 'bias' the
auxiliary-loss-free bias, 'none'), DeepSeek-V3's sequence-wise loss, the z-loss, renormalisation
and scale, and capacity with token dropping. Top-k may also give its router a dense gradient
(Default MoE, TopKRouter).

Legend for shape comments: N tokens, E experts, K active experts per token, D model width,
m = E/K experts per prototype group.
"""

import math

import torch
import torch.nn.functional as F

from routers import LearnedRouter, RECURRENT_OPTIONS, register, routing_stats

SCORES = ('softmax', 'sigmoid')  # how topk and prototype turn logits into scores
BALANCES = ('aux', 'bias', 'none')  # how topk and prototype balance their load


def switch_balance_loss(probs, gates, top_k, seq_len=None):
    """Switch Transformer eq. 4, generalised to top-k as in GShard / DeepSeekMoE.

    loss = E * sum_e f_e * P_e, with f_e the fraction of the N*K assignments that went to
    expert e (a count: no gradient) and P_e the mean router probability of e (differentiable).
    Dividing the counts by N*K rather than N makes the value 1 under uniform routing for every k.

    seq_len=T: DeepSeek-V3's sequence-wise balance loss (eq. 17-20), the same sum taken over each
    sequence of T tokens and averaged over the N/T sequences. Its eq. 18, f_i = E/(K T) * (tokens of
    the sequence choosing i), is E * f_e here; eq. 20's P_i = (1/T) sum_t s'_{i,t} is P_e, with
    probs the scores normalised over the experts (eq. 19: s' = s / sum_j s). None: one sequence.
    """
    N, E = probs.shape
    T = N if seq_len is None else seq_len
    f = (gates > 0).view(N // T, T, E).sum(1).float() / (T * top_k)  # [B, E], detached by construction
    P = probs.view(N // T, T, E).mean(1)  # [B, E]
    return E * (f * P).sum(-1).mean()


def z_loss(logits):
    """ST-MoE eq. 5: mean squared log-partition, keeps router logits small (bf16-safe)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity_keep(picks, n_expert, capacity):
    """Which assignments fit in their expert's buffer of `capacity` slots (GShard / Switch).

    picks [N, R]: each token's experts, in order of preference. Slots are filled in rank-major
    order, every token's first pick before any second pick, tokens in order within a rank, so an
    overflow drops the least important assignments. Returns keep [N, R] (bool), per pick.
    """
    choices = F.one_hot(picks.t(), n_expert)  # [R, N, E], the r-th pick of every token
    R, N, E = choices.shape
    slot = choices.reshape(R * N, E).cumsum(0).reshape(R, N, E)  # 1-based slot in the expert's buffer
    return ((slot * choices).sum(-1) <= capacity).t()  # the slot each pick took, [N, R]


SOFTMAX_OPTIONS = ('capacity_factor', 'balance', 'aux_loss_coef', 'bias_update_rate', 'z_loss_coef',
                   'aux_loss_reduction', 'router_renorm', 'score', 'route_scale', 'seq_aux_coef')


class SoftmaxRouter(LearnedRouter):
    """The softmax family (top-k, prototyping): scores from the logits, a choice of experts, and the
    knobs around it: balancing (`balance`: the Switch loss, DeepSeek's loss-free bias, or none), a
    sequence-wise loss, the z-loss, sigmoid scores, renormalisation and scale, capacity."""

    options = RECURRENT_OPTIONS + SOFTMAX_OPTIONS
    stats = LearnedRouter.stats + ('kept_prob', 'top1_top2', 'bias', 'bias_spread')

    def __init__(self, config, gru=None):
        super().__init__(config, gru)
        self.capacity_factor = config.capacity_factor
        self.renorm = config.router_renorm
        self.score = config.score
        self.route_scale = config.route_scale
        # the model sums every MoE layer's aux loss; 'mean' turns that sum into an average
        layers = 1 / self.n_moe_layers if config.aux_loss_reduction == 'mean' else 1.0
        self.aux_loss_coef = config.aux_loss_coef * layers
        self.z_loss_coef = config.z_loss_coef * layers
        self.seq_aux_coef = config.seq_aux_coef * layers
        self.balance = config.balance
        if self.balance == 'bias':  # auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664)
            # an fp32 buffer outside autograd, like ReMoE's λ: checkpointed, moved only by update()
            self.register_buffer('bias', torch.zeros(self.n_expert, dtype=torch.float32))
            self.bias_update_rate = config.bias_update_rate

    @classmethod
    def ignored(cls, config):
        ignored = super().ignored(config)
        if config.get('balance', 'aux') != 'aux':
            ignored['aux_loss_coef'] = f"with balance={config['balance']!r} (only 'aux' has the Switch loss)"
        if config.get('balance', 'aux') != 'bias':
            ignored['bias_update_rate'] = f"with balance={config.get('balance', 'aux')!r} (only 'bias' has a bias)"
        return ignored

    @classmethod
    def kind(cls, run):
        parts = super().kind(run)  # [name, recurrent..., shared?]
        shared = parts[-1:] if parts[-1] == 'shared' else []
        parts = parts[:len(parts) - len(shared)] + cls.variant(run)
        parts += {'aux': [], 'bias': ['bias'], 'none': ['noaux']}[run.get('balance', 'aux')]  # older runs: aux
        parts += ['seqaux'] if run.get('seq_aux_coef', 0) else []
        # '-norenorm' last: configs/topk.py renormalises; runs logged before router_renorm existed did not
        return parts + shared + ([] if run.get('router_renorm', False) else ['norenorm'])

    @classmethod
    def variant(cls, run):
        return ['sigmoid'] if run.get('score', 'softmax') == 'sigmoid' else []

    def console(self, record):
        line = super().console(record)  # and the dropped fraction, where capacity drops
        return line + (f", dropped {100 * sum(record['dropped']) / len(record['dropped']):.1f}%"
                       if self.capacity_factor > 0 else '')

    def capacity(self, n_tokens):
        """Slots per expert: capacity_factor * K * N / E, rounded up (0 = dropless)."""
        return math.ceil(self.capacity_factor * self.top_k * n_tokens / self.n_expert)

    def drop_overflow(self, gates, picks, weights, stats):
        """Zero the assignments past their expert's capacity (training only: evaluation and
        sampling are dropless, so a token's output never depends on the rest of the batch).
        picks [N, K]: each token's experts, in order of preference; weights [N, K]: their gates.
        The kept gates are scattered afresh rather than `gates * keep`: in torch 2.13 inductor
        handed the expert op an all-zero gate matrix for that product (compiled MoE output 0)."""
        if self.capacity_factor > 0 and self.training:
            keep = capacity_keep(picks, self.n_expert, self.capacity(gates.size(0)))  # [N, K]
            stats['dropped'] = 1 - keep.float().mean()
            return torch.zeros_like(gates).scatter(1, picks, weights * keep)
        stats['dropped'] = gates.new_zeros(())
        return gates

    def scores(self, logits):
        """Logits -> (scores, probs), over the last dim (all E experts, or one prototype group).
        'softmax': both are the softmax. 'sigmoid' (DeepSeek-V3 eq. 15): s = sigmoid(u_t . e_i), each
        expert scored on its own; the gates are read from s, while the balance losses and the logged
        entropy see probs = s normalised over the experts (DeepSeek-V3 eq. 19), a distribution."""
        if self.score == 'softmax':
            probs = logits.softmax(dim=-1)
            return probs, probs
        s = logits.sigmoid()
        return s, s / s.sum(dim=-1, keepdim=True)

    def gate_values(self, s, top_s):
        """Scores s -> gate values: times route_scale, and first over the kept scores' sum top_s
        [N, K] under router_renorm (DeepSeek-V3 eq. 13 renormalises the selected sigmoid scores to
        sum to 1, then scales them by its routed_scaling_factor). s: the kept scores top_s
        themselves, or any scores of the same tokens ([N, E]: Default MoE's unchosen experts)."""
        if self.renorm:
            s = s / top_s.sum(dim=-1, keepdim=True)
        return s * self.route_scale if self.route_scale != 1 else s  # (x 1 is exact: one op saved)

    def selection_scores(self, probs):
        """What top-k (top-1 per group) ranks: the probabilities, plus the balancing bias under
        balance='bias' (2408.15664 eq. 3). Only the choice of experts sees the bias: the gate values
        are read from probs, so the bias never enters the output nor receives a gradient."""
        if self.balance != 'bias':
            return probs
        return probs + self.bias.view(probs.shape[1:])  # [N, E], or [N, K, m] for prototype's groups

    def balance_loss(self, loss):
        """The Switch loss weighted by its coefficient under balance='aux'; nothing otherwise. Nothing
        is written 0 * loss, not a constant 0: in torch 2.13 a compiled `lm_loss + constant` comes
        back without grad_fn (the same bug as the dense model's `loss + 0`, see GPT.forward)."""
        return (self.aux_loss_coef if self.balance == 'aux' else 0.0) * loss

    def with_z_loss(self, aux_loss, logits):
        return aux_loss + self.z_loss_coef * z_loss(logits) if self.z_loss_coef > 0 else aux_loss

    def with_seq_loss(self, aux_loss, probs, gates, top_k, seq_len):
        """DeepSeek-V3's sequence-wise balance loss (eq. 17), added to whatever `balance` does: with
        balance='bias' it is DeepSeek-V3's recipe, a tiny loss that only stops single sequences from
        being extreme. seq_len None: x is one sequence."""
        if self.seq_aux_coef == 0:
            return aux_loss
        return aux_loss + self.seq_aux_coef * switch_balance_loss(probs, gates, top_k, seq_len)

    def add_bias_stats(self, stats):
        if self.balance == 'bias':
            stats['bias'] = self.bias.clone()  # [E], as this forward used it
            stats['bias_spread'] = self.bias.max() - self.bias.min()

    @torch.no_grad()
    def update(self, sparsity, load):
        if self.balance == 'bias':
            # 2408.15664 Alg. 1: b_e += u * sign(mean load - load_e), underloaded experts up, overloaded down
            self.bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
            # Kept zero-mean. A constant added to every score changes no top-k or per-group top-1
            # choice, so only differences of bias matter; but the sign steps do not sum to zero (one
            # overloaded expert, seven underloaded: +6u a step), and an uncentred bias would drift
            # without bound, spending fp32 precision beside probabilities of ~0.1.
            self.bias.sub_(self.bias.mean())


@register
class TopKRouter(SoftmaxRouter):
    """The classic baseline: softmax over all experts, keep the K largest (GShard, Switch).

    The kept probabilities are used as gates as they are by default, so with K = 1 the router
    still receives a language-model gradient (with renormalised top-1 it would get none); `router_renorm=True`
    rescales them to sum to 1 per token, as Mixtral does (and as the RMoE code does).

    dense_grad=True is Default MoE (Panda et al., arXiv 2504.12463): only the chosen experts S_n
    run, and for every expert a token did not choose, that expert's default output, an EMA of its
    outputs over the tokens it did run, stands in for it in the router's gradient:

        y_n = sum_{e in S_n} w_ne FFN_e(x_n) + sum_{e not in S_n} w_ne EMA_e

    with w_ne the weight each expert would have as a gate (its probability; its score divided by the
    chosen scores' sum under router_renorm, times route_scale). So dL/dw_ne = <dy_n, EMA_e> for every
    unchosen expert too: every router probability gets a gradient. The paper's summaries call it
    sparse in the forward and dense in the backward, so by default the second sum enters as
    d - d.detach(): the output is top-k's exactly and only the gradient sees the defaults.
    dense_grad_forward=True adds it to the output as well (this repo's first reading, kept because
    results/modern and results/dense-grad were made with it). EMA_e [D] is an fp32 buffer outside
    autograd, moved once per optimizer step by update_defaults (beta = dense_grad_beta). The EMA rate
    and equation numbers are not taken from the paper: 0.9 per step is this repo's choice.
    The forward returns the second sum as stats['default_out'] [N, D], which the MoE block adds to
    the experts' output (and removes from the statistics): the experts still see only the gates.
    """

    name = 'topk'
    options = SoftmaxRouter.options + ('dense_grad', 'dense_grad_beta', 'dense_grad_forward')
    stats = SoftmaxRouter.stats + ('ema_norm',)

    def __init__(self, config, gru=None):
        super().__init__(config, gru)
        self.dense_grad = config.dense_grad
        if self.dense_grad:  # Default MoE: each expert's output, averaged over training
            # an fp32 buffer outside autograd, like the bias: checkpointed, moved only by update_defaults()
            self.register_buffer('expert_ema', torch.zeros(self.n_expert, config.n_embd, dtype=torch.float32))
            self.ema_beta = config.dense_grad_beta
            self.dense_grad_forward = config.dense_grad_forward

    @classmethod
    def check(cls, config):
        if config.dense_grad_forward and not config.dense_grad:
            raise ValueError("dense_grad_forward=True needs dense_grad=True (it says where Default MoE's defaults go)")
        if not 0 <= config.dense_grad_beta < 1:
            raise ValueError(f"dense_grad_beta={config.dense_grad_beta} must be in [0, 1) (the EMA's decay per step)")

    @classmethod
    def ignored(cls, config):
        ignored = super().ignored(config)
        if not config.get('dense_grad', False):
            ignored.update({key: 'without dense_grad=True' for key in ('dense_grad_beta', 'dense_grad_forward')})
        return ignored

    @classmethod
    def variant(cls, run):  # runs logged before dense_grad_forward existed put the defaults in the forward
        dense = (['densegrad', 'fwd'] if run.get('dense_grad_forward', True) else ['densegrad']) \
            if run.get('dense_grad') else []
        return super().variant(run) + dense

    def forward(self, x, state=None, seq_len=None, measure=True, ids=None):
        logits, state = self.logits(x, state)  # [N, E]
        scores, probs = self.scores(logits)  # [N, E] each
        top_i = self.selection_scores(scores).topk(self.top_k, dim=-1).indices  # [N, K]
        top_s = scores.gather(1, top_i)  # [N, K]
        top_p = self.gate_values(top_s, top_s)  # [N, K]
        gates = torch.zeros_like(probs).scatter(1, top_i, top_p)  # [N, E], K non-zeros per row
        stats = {}
        if self.dense_grad:  # Default MoE (see the class docstring): the unchosen experts' weights
            unchosen = self.gate_values(scores, top_s).scatter(1, top_i, 0.0)  # [N, E], zero where chosen
            stats['default_out'] = unchosen @ self.expert_ema  # [N, D], part of the output: always made
        if not measure:
            return gates.to(x.dtype), logits.new_zeros(()), stats, state
        aux_loss = self.balance_loss(switch_balance_loss(probs, gates, self.top_k))
        aux_loss = self.with_seq_loss(aux_loss, probs, gates, self.top_k, seq_len)
        stats.update(routing_stats(gates, probs, logits))
        self.add_bias_stats(stats)
        if self.dense_grad:
            stats['ema_norm'] = self.expert_ema.norm(dim=-1).mean()  # the defaults' size, logged
        gates = self.drop_overflow(gates, top_i, top_p, stats)
        return gates.to(x.dtype), self.with_z_loss(aux_loss, logits), stats, state

    @torch.no_grad()
    def update_defaults(self, expert_sum, expert_count):
        """Default MoE, once per optimizer step: expert_sum [E, D], each expert's output summed over
        the tokens it ran in that step's training forwards (all micro-steps and ranks), and
        expert_count [E], how many tokens those were. EMA_e <- beta * EMA_e + (1 - beta) * sum_e / count_e
        for every expert that ran; one that ran no token keeps its EMA (it has nothing new to say)."""
        mean = expert_sum.float() / expert_count.float().clamp_min(1)[:, None]  # [E, D]
        moved = self.ema_beta * self.expert_ema + (1 - self.ema_beta) * mean
        self.expert_ema.copy_(torch.where(expert_count[:, None] > 0, moved, self.expert_ema))



@register
class PrototypeRouter(SoftmaxRouter):
    """Expert prototyping (M6-T, Yang et al. 2021): the E experts form K contiguous groups of
    m = E/K; a softmax and a top-1 inside each group; the K outputs are summed. Exactly one expert
    per group, so K per token, never two from one group. The weights are each group's top-1
    probability, not renormalised by default (`router_renorm=True` makes them sum to 1)."""

    name = 'prototype'

    @classmethod
    def check(cls, config):
        if config.n_expert % config.top_k:
            raise ValueError(f"router='prototype' needs top_k={config.top_k} groups to divide "
                             f"n_expert={config.n_expert}")

    def forward(self, x, state=None, seq_len=None, measure=True, ids=None):
        logits, state = self.logits(x, state)  # [N, E]
        N, K = logits.size(0), self.top_k
        m = self.n_expert // K
        scores, probs = self.scores(logits.view(N, K, m))  # [N, K, m] each, within each group
        top_i = self.selection_scores(scores).argmax(dim=-1)  # [N, K] top-1 per group
        top_s = scores.gather(2, top_i[..., None]).squeeze(2)  # [N, K]
        top_p = self.gate_values(top_s, top_s)  # [N, K]
        expert = top_i + m * torch.arange(K, device=x.device)  # [N, K] global expert ids
        gates = torch.zeros_like(logits).scatter(1, expert, top_p)  # [N, E]
        if not measure:
            return gates.to(x.dtype), logits.new_zeros(()), {}, state
        # the Switch loss inside each group (minimum 1 per group, K in all)
        group_gates = gates.view(N, K, m)
        aux_loss = self.balance_loss(sum(switch_balance_loss(probs[:, j], group_gates[:, j], 1) for j in range(K)))
        for j in range(K):
            aux_loss = self.with_seq_loss(aux_loss, probs[:, j], group_gates[:, j], 1, seq_len)
        stats = routing_stats(gates, probs, logits)
        self.add_bias_stats(stats)
        # groups own disjoint experts, so their capacities never interact
        gates = self.drop_overflow(gates, expert, top_p, stats)
        return gates.to(x.dtype), self.with_z_loss(aux_loss, logits), stats, state
