"""
The routers the seed papers rank themselves against, each one class registered in routers.ROUTERS.

- ReMoE (arXiv 2412.14711) Table 2, at E = 8 and k = 1: Hash, Lory, SparseMixer-v2, Expert Choice.
- RMoE (arXiv 2408.06793) Table 1: SMoE-MLP, RandomSMoE, CosineMoE, XMoE, HyperRouter.

Legend for shape comments: N tokens, E experts, K active experts per token, D model width.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from routers import LearnedRouter, Router, register, routing_stats
from softmax_routers import TopKRouter, switch_balance_loss, z_loss


@register
class HashRouter(Router):
    """Hash layers (Roller et al. 2021, arXiv 2106.04426): each token goes to the expert its id hashes
    to, with gate 1; no router parameters and no balance loss. As ReMoE ran it (Table 2): expert =
    id mod E. hash_table='random' is Roller et al.'s own: a fixed random expert per vocabulary entry,
    drawn once from hash_seed (balanced: every expert gets vocab_size / E ids, up to one).
    top_k > 1 is refused: a hash picks one expert per token (Roller et al. §3 hash once)."""

    name = 'hash'
    options = ('hash_table', 'hash_seed')
    stats = ('load', 'active', 'sparsity', 'entropy', 'gate_sum', 'dropped')
    learned = False
    needs_ids = True
    top_k_max = 1

    def __init__(self, config):
        super().__init__(config)
        if config.hash_table == 'random':  # a balanced random assignment of the vocabulary, fixed by the seed
            g = torch.Generator().manual_seed(config.hash_seed)
            table = (torch.arange(config.vocab_size) % self.n_expert)[torch.randperm(config.vocab_size, generator=g)]
        else:  # 'mod': expert = id mod E, as ReMoE's baseline
            table = torch.arange(config.vocab_size) % self.n_expert
        self.register_buffer('table', table, persistent=False)  # rebuilt from the config: never stale

    @classmethod
    def check(cls, config):
        if config.hash_table not in ('mod', 'random'):
            raise ValueError(f"hash_table={config.hash_table!r} is not 'mod' or 'random'")
        if config.vocab_size < config.n_expert:  # (mod or random: some expert would never see a token)
            raise ValueError(f"router='hash' with a vocabulary of {config.vocab_size} ids cannot feed "
                             f"n_expert={config.n_expert} experts: use n_expert <= {config.vocab_size}")
        if config.top_k != 1 or config.expert_granularity != 1:
            raise ValueError(f"router='hash' picks one expert per token: use top_k=1 (not {config.top_k}) and "
                             f"expert_granularity=1 (not {config.expert_granularity})")

    @classmethod
    def ignored(cls, config):
        return {'hash_seed': "with hash_table='mod' (only 'random' draws a table)"} \
            if config.get('hash_table', 'mod') == 'mod' else {}

    @classmethod
    def kind(cls, run):
        return super().kind(run)[:1] + (['random'] if run.get('hash_table', 'mod') == 'random' else []) + \
            super().kind(run)[1:]

    def forward(self, x, state=None, seq_len=None, measure=True, ids=None):
        expert = self.table[ids]  # [N]
        gates = torch.zeros(x.size(0), self.n_expert, device=x.device, dtype=x.dtype)
        gates = gates.scatter(1, expert[:, None], 1.0)  # [N, E], one gate of 1 per row
        if not measure:
            return gates, x.new_zeros((), dtype=torch.float32), {}, state
        stats = routing_stats(gates.float())
        stats['dropped'] = gates.new_zeros((), dtype=torch.float32)
        return gates, x.new_zeros((), dtype=torch.float32), stats, state


@register
class ExpertChoiceRouter(LearnedRouter):
    """Expert Choice (Zhou et al. 2022, arXiv 2202.09368 §3.2): S = softmax(x W) over the experts of
    each token; each expert takes its top-C tokens of S's column, C = ec_capacity * T * K / E
    (rounded down) per sequence of T tokens, so that a token gets ec_capacity * K experts on average
    (Zhou et al.'s c is ec_capacity * K: EC-CF2 is K = 2 here); the gate is the chosen score, not renormalised. A token
    may get no expert (its MoE output is 0) or several. No balance loss: every expert takes exactly C.

    It is not causal: whether token t is taken depends on the scores of the later tokens of its
    sequence (never of other sequences: the groups are the sequences, so 2 processes train as one).
    So evaluation, the final score and generation use a causal rule on the same scores, ec_eval:
    'topk', token choice, each token's K best experts with their scores as gates (Lory's EC baseline,
    arXiv 2405.03133 §4); 'choice' scores with the training rule, teacher-forced and leaky, which may
    change on resume (--init_from=resume --eval_only=True --ec_eval=choice) to measure the leak."""

    name = 'expert_choice'
    options = LearnedRouter.options + ('ec_capacity', 'ec_eval', 'z_loss_coef', 'aux_loss_reduction')
    stats = LearnedRouter.stats + ('kept_prob', 'top1_top2', 'unrouted')

    def __init__(self, config, gru=None):
        super().__init__(config, gru)
        self.capacity, self.eval_rule = config.ec_capacity, config.ec_eval
        self.z_loss_coef = config.z_loss_coef / self.n_moe_layers if config.aux_loss_reduction == 'mean' \
            else config.z_loss_coef

    @classmethod
    def tokens_per_expert(cls, capacity, T, K, E):
        return min(T, int(capacity * T * K / E))

    @classmethod
    def check(cls, config):
        if config.ec_eval not in ('topk', 'choice'):
            raise ValueError(f"ec_eval={config.ec_eval!r} is not 'topk' (causal) or 'choice' (the training rule)")
        E, K, _ = config.moe_shape()
        if cls.tokens_per_expert(config.ec_capacity, config.block_size, K, E) < 1:
            raise ValueError(f"ec_capacity={config.ec_capacity} gives each expert C = 0 of the block_size="
                             f"{config.block_size} tokens: use ec_capacity >= n_expert / (block_size * top_k) "
                             f"= {E / (config.block_size * K):.3g}")

    def forward(self, x, state=None, seq_len=None, measure=True, ids=None):
        logits, state = self.logits(x, state)  # [N, E]
        probs = logits.softmax(dim=-1)  # [N, E], over the experts of each token
        N, E = probs.shape
        T = seq_len or N
        if self.training or self.eval_rule == 'choice':  # each expert its top-C tokens of each sequence
            C = self.tokens_per_expert(self.capacity, T, self.top_k, E)
            per_seq = probs.view(N // T, T, E)
            top_i = per_seq.topk(C, dim=1).indices  # [B, C, E]: the tokens each expert takes
            gates = torch.zeros_like(per_seq).scatter(1, top_i, per_seq.gather(1, top_i)).view(N, E)
        else:  # the causal rule: token choice over the same scores
            top_i = probs.topk(self.top_k, dim=-1).indices  # [N, K]
            gates = torch.zeros_like(probs).scatter(1, top_i, probs.gather(1, top_i))
        if not measure:
            return gates.to(x.dtype), logits.new_zeros(()), {}, state
        stats = routing_stats(gates, probs, logits)
        stats['unrouted'] = ((gates > 0).sum(-1) == 0).float().mean()  # tokens no expert took
        stats['dropped'] = gates.new_zeros(())
        aux_loss = self.z_loss_coef * z_loss(logits)  # no balance loss (Zhou et al.: each expert takes C)
        return gates.to(x.dtype), aux_loss, stats, state

    @classmethod
    def kind(cls, run):
        return super().kind(run) + (['choice'] if run.get('ec_eval', 'topk') == 'choice' else [])

    def score_variants(self):
        # the final score with the training rule too, beside the causal one: how much the leak is worth
        return {'teacher_forced': {'eval_rule': 'choice'}} if self.eval_rule != 'choice' else {}


@register
class SparseMixerRouter(LearnedRouter):
    """SparseMixer-v2 (GRIN, Liu et al. 2024, arXiv 2409.12136; ReMoE Table 2 ran it at k = 1). Per
    round: the experts whose logit is within a relative 2 eps of the largest survive a mask, p is the
    softmax over them; training samples the expert D from p (Gumbel-max), evaluation takes the argmax;
    the gate is c * p_D with p_D's gradient (Heun's estimator, below). Top-2 repeats the round on the
    remaining experts, with a new mask and softmax; the weights are not renormalised (they may sum past
    1). The Switch loss at aux_loss_coef reads the unmasked softmax and the chosen experts. eps = sparsemixer_eps (0.01,
    PhiMoE's released router_jitter_noise; ReMoE does not state its value)."""

    name = 'sparsemixer'
    batch_independent = False  # its training samples draw from one random stream over the whole batch
    options = LearnedRouter.options + ('aux_loss_coef', 'aux_loss_reduction', 'sparsemixer_eps')
    stats = LearnedRouter.stats + ('kept_prob', 'top1_top2', 'resampled', 'heun_c')

    def __init__(self, config, gru=None):
        super().__init__(config, gru)
        self.eps = config.sparsemixer_eps
        layers = 1 / self.n_moe_layers if config.aux_loss_reduction == 'mean' else 1.0
        self.aux_loss_coef = config.aux_loss_coef * layers

    @classmethod
    def check(cls, config):
        if not config.sparsemixer_eps > 0:
            raise ValueError(f"sparsemixer_eps={config.sparsemixer_eps} must be > 0 (the mask's relative width)")

    def forward(self, x, state=None, seq_len=None, measure=True, ids=None):
        logits, state = self.logits(x, state)  # [N, E]
        z, picks, weights, resampled, heun = logits, [], [], [], []
        for _ in range(self.top_k):  # GRIN Algorithm 3: the next round on the experts not yet chosen
            with torch.no_grad():
                top = z.max(dim=-1, keepdim=True).values  # [N, 1]
                outside = (top - z) / z.abs().clamp(min=top) > 2 * self.eps  # the mask: far below the top
            masked = z.masked_fill(outside, float('-inf'))
            p = masked.softmax(dim=-1)  # [N, E]
            best = z.argmax(dim=-1, keepdim=True)  # [N, 1]
            if self.training:  # Gumbel-max sampling from p, and Heun's c
                chosen = (masked - torch.empty_like(masked).exponential_().log()).argmax(dim=-1, keepdim=True)
                keep = (chosen == best) | (torch.rand_like(top) > 0.75)
                c = torch.where(keep, 1.0, 1 / 3)
                # GRIN eq. 8: the forward value is c * p_D, the gradient to the logits is p_D's own (through
                # the masked softmax: g p_D (onehot(D) - p)), without c: c places the point at which the rest
                # of the network is differentiated, Heun's third-order rule (1/4 f'(x) + 3/4 f'(x/3)), and is
                # not itself differentiated (GRIN Algorithm 1: y = h + detach(c h - h))
                p_d = p.gather(1, chosen)  # [N, 1]
                weights.append(p_d + (c - 1) * p_d.detach())
                resampled.append((chosen != best).float().mean())
                heun.append(c.mean())
            else:
                chosen = best
                weights.append(p.gather(1, chosen))
            picks.append(chosen)
            z = z.scatter(1, chosen, float('-inf'))
        picks, weights = torch.cat(picks, 1), torch.cat(weights, 1)  # [N, K] each
        gates = torch.zeros_like(logits).scatter(1, picks, weights)  # [N, E]
        if not measure:
            return gates.to(x.dtype), logits.new_zeros(()), {}, state
        probs = logits.softmax(dim=-1)
        aux_loss = self.aux_loss_coef * switch_balance_loss(probs, gates.detach(), self.top_k)
        stats = routing_stats(gates, probs, logits)
        stats['dropped'] = gates.new_zeros(())
        if self.training:
            stats['resampled'] = sum(resampled) / self.top_k  # samples that were not the argmax
            stats['heun_c'] = sum(heun) / self.top_k  # the mean forward scale c
        return gates.to(x.dtype), aux_loss, stats, state


# -----------------------------------------------------------------------------
# RMoE Table 1's routers: top-k softmax (SMoE) with another map from tokens to logits. Each keeps every
# knob of top-k (the Switch loss at aux_loss_coef, renormalisation, capacity), as RMoE ran them: top-2
# with the balance loss 0.01 (RMoE §4.1). With recurrent_router=True the map reads RMoE's GRU state.


def rmoe_router_params(config):
    """Parameters of RMoE's recurrent router per MoE layer: its projector D -> p, its logits p -> E,
    and its share of the GRU cell (3 gates, input and hidden weights and biases) all layers share."""
    D, p, E, L = config.n_embd, config.rmoe_dim, config.moe_shape()[0], config.n_moe_layers()
    return D * p + p * E + (6 * p * p + 6 * p) / L


@register
class MLPRouter(TopKRouter):
    """SMoE-MLP (RMoE Table 1 and Table 4, after Shen et al. 2023): logits = W2 GELU(W1 x), no biases.
    router_hidden = 0 sizes W1 to match the parameters of RMoE's router (rmoe_router_params: at the
    CPU shapes D = 128, p = 64, E = 8, 4 layers, 14,944 a layer, so H = 110: 14,960): Table 4's
    question, whether a bigger router is what helps, asked at equal size. (RMoE's own SMoE-MLP was
    not matched: 0.75M router parameters against RMoE's 0.47M.)"""

    name = 'mlp'
    options = TopKRouter.options + ('router_hidden',)

    def make_logits(self, config, in_dim, bias):
        hidden = config.router_hidden or max(1, round(rmoe_router_params(config) / (in_dim + self.n_expert)))
        return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.GELU(),
                             nn.Linear(hidden, self.n_expert, bias=False))


class FrozenLinear(nn.Module):
    """A linear map whose weight is a buffer: saved and moved with the model, never trained."""

    def __init__(self, in_dim, out_dim, std):
        super().__init__()
        self.register_buffer('weight', torch.randn(out_dim, in_dim) * std)

    def forward(self, x):
        return x @ self.weight.t()


@register
class RandomRouter(TopKRouter):
    """RandomSMoE (RMoE Table 1, after SMoE-Dropout, Chen et al. 2023): a linear router drawn at random
    (normal, init_std) and frozen: a buffer, out of the optimizer. Top-k and the Switch loss stay on, as
    RMoE ran it; with the router frozen the loss can only move the hidden states (through x W)."""

    name = 'random'
    learned = False  # no parameter: nothing for DDP to find unused

    @classmethod
    def check(cls, config):
        super().check(config)
        if config.recurrent_router:
            raise ValueError("recurrent_router=True with router='random' is invalid: a frozen random router "
                             "has nothing for RMoE's GRU to train; use router='topk'")

    def make_logits(self, config, in_dim, bias):
        return FrozenLinear(in_dim, self.n_expert, config.init_std)


class CosineLogits(nn.Module):
    """s_e = cos(P x, w_e) / τ (X-MoE, Chi et al. 2022, arXiv 2204.09179): the token, projected to
    `dim` dimensions (none for CosineMoE), against L2-normalised expert embeddings w_e, under a learned
    temperature τ. The logits are bounded by 1/τ. τ starts at 0.07 (X-MoE's TEMPERATURE_FOR_L_UAX; the
    paper's own initial value is not given) and is kept >= 0.01: bounded logits at most 100."""

    TAU0, TAU_MIN = 0.07, 0.01

    def __init__(self, in_dim, n_expert, dim):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=False) if dim else None
        self.embed = nn.Linear(dim or in_dim, n_expert, bias=False)  # the expert embeddings w_e: its rows
        self.log_tau = nn.Parameter(torch.tensor(math.log(self.TAU0)))

    def tau(self):
        return self.log_tau.exp().clamp_min(self.TAU_MIN)

    def forward(self, x):
        z = self.proj(x) if self.proj is not None else x
        return F.normalize(z, dim=-1) @ F.normalize(self.embed.weight, dim=-1).t() / self.tau()  # [N, E]


@register
class CosineRouter(TopKRouter):
    """CosineMoE (RMoE Table 1): X-MoE's cosine router without the down-projection (CosineLogits)."""

    name = 'cosine'

    def make_logits(self, config, in_dim, bias):
        return CosineLogits(in_dim, self.n_expert, 0)


@register
class XMoERouter(TopKRouter):
    """XMoE (Chi et al. 2022; RMoE Table 1, and Table 2 with the GRU router under it): the token
    projected to xmoe_dim (16, RMoE's default) before the cosine (CosineLogits). X-MoE's released code
    normalises only the experts and rescales them to norm 1.5; this is the paper's form as RMoE
    describes it, both sides normalised, with a learned temperature."""

    name = 'xmoe'
    options = TopKRouter.options + ('xmoe_dim',)

    def make_logits(self, config, in_dim, bias):
        return CosineLogits(in_dim, self.n_expert, config.xmoe_dim)


class HyperLogits(nn.Module):
    """HyperRouter (Do et al. 2023, arXiv 2312.07035): a fixed random hypernetwork H (Linear, ReLU,
    Linear; PyTorch's default init, frozen as buffers) makes the router [W | b] = H(e) from a trainable
    embedding e [in_dim]. W depends on no token: a re-parameterised linear router with in_dim trainable
    numbers per layer."""

    def __init__(self, in_dim, n_expert, hidden):
        super().__init__()
        self.n_expert = n_expert
        self.embedding = nn.Parameter(torch.randn(in_dim) * 0.02)
        for name, (fan_in, fan_out) in (('1', (in_dim, hidden)), ('2', (hidden, n_expert * (in_dim + 1)))):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default U(±1/sqrt(fan_in)), weight and bias
            self.register_buffer(f'h{name}_weight', torch.empty(fan_out, fan_in).uniform_(-bound, bound))
            self.register_buffer(f'h{name}_bias', torch.empty(fan_out).uniform_(-bound, bound))

    def forward(self, x):
        h = F.relu(F.linear(self.embedding, self.h1_weight, self.h1_bias))
        wb = F.linear(h, self.h2_weight, self.h2_bias).view(self.n_expert, -1)  # [E, in_dim + 1]
        return F.linear(x, wb[:, :-1], wb[:, -1])  # [N, E]


@register
class HyperRouter(TopKRouter):
    """HyperRouter, which RMoE Table 1 lists as HyperMoE (its reference list cites Do et al. 2023):
    top-k over the logits of a router generated by a frozen hypernetwork (HyperLogits). router_hidden
    is H's hidden width, 0 = 256 (the reference code's default)."""

    name = 'hyperrouter'
    options = TopKRouter.options + ('router_hidden',)

    def make_logits(self, config, in_dim, bias):
        return HyperLogits(in_dim, self.n_expert, config.router_hidden or 256)
