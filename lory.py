"""
Lory (Zhong et al. 2024, arXiv 2405.03133): a fully differentiable MoE that merges the experts'
weights instead of mixing their outputs, ranked in ReMoE Table 2 (arXiv 2412.14711).

A sequence is cut into segments of S tokens. Segment k runs ONE SwiGLU whose weights are the
experts' weights averaged with the routing weights e_k (Lory eq. 2-3):

    e_k = softmax(W h_{k-1})        h_{k-1}: the mean hidden state of segment k-1 (Lory §3.1)
    y_x = FFN(x; sum_i e_k,i theta_i)   for every token x of segment k

A merged FFN is not a mix of the experts' outputs (SwiGLU is not linear), so it does not fit the
gate contract of routers.py: this module takes the MoE block's place, and its router (LoryRouter)
only makes the routing weights. Segment k is routed from segment k-1, which lies wholly before it,
so the block is causal. The paper routes the first segment on its own mean, with a stop-gradient:
its tokens would then see the later tokens of their segment in the forward pass. Here the first
segment merges the experts uniformly, e_1 = 1/E (causal, and no parameter of its own).

Generation routes exactly as the forward does, segment by segment from the previous segment's
mean (Lory Table 6's "re-route every segment"; its prompt-only routing differed from it by at most
0.3 on downstream averages): so the KV-cache steps equal the uncached loop, and the model's
function does not depend on where a prompt ends. A KVCache carries each Lory layer's running sum of
the current segment and its merge weights.

Legend: B batch, T sequence, S segment length, G segments in a sequence, D model width, E experts,
H hidden width of one expert.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts import Experts
from pairs import swiglu
from routers import LearnedRouter, register, routing_stats


class LoryMoE(nn.Module):
    """The MoE block of a Lory model: merged SwiGLU experts per segment (see the module docstring).
    Its interface is model.MoE's: forward(x [B, T, D], state, cache, ids) -> y, aux_loss, stats, state.
    Its router is called as every router is (the lab's hooks read its gates: each token's segment
    weights), and the merge weights are read back from those gates."""

    def __init__(self, config, gru=None, layer=0):
        super().__init__()
        E, _, H = config.moe_shape()
        self.layer, self.segment = layer, LoryRouter.segment_length(config)
        self.router = LoryRouter(config)
        self.experts = Experts(E, config.n_embd, H, 'loop', config.init_std)  # the weights; its dispatch is unused
        self.shared = None  # (no shared experts: LoryRouter refuses n_shared_expert)

    def merged_ffn(self, x, e):
        """x [B, G, S, D] with each segment's merge weights e [B, G, E] -> y [B, G, S, D]: one SwiGLU a
        segment, its weights sum_i e_i theta_i made explicitly (B * G merged FFNs, E times smaller
        matmuls than the tokens' own: Lory §2.2's overhead)."""
        w_in = torch.einsum('bge,edh->bgdh', e, self.experts.w_in)  # [B, G, D, 2H]
        w_out = torch.einsum('bge,ehd->bghd', e, self.experts.w_out)  # [B, G, H, D]
        return swiglu(x @ w_in) @ w_out

    def forward(self, x, state, cache=None, ids=None):
        B, T, D = x.shape
        if cache is not None and cache.pos > 0:  # a one-position step of generation
            return self.decode_step(x, cache), x.new_zeros((), dtype=torch.float32), {}, state
        S = self.segment
        G = -(-T // S)  # segments, the last one possibly partial (evaluation's tail, a prompt)
        padded = F.pad(x, (0, 0, 0, G * S - T)).view(B, G, S, D)
        gates, aux_loss, stats, state = self.router(x.reshape(B * T, D), state, seq_len=T, measure=cache is None)
        e = gates.view(B, T, -1)[:, ::S]  # [B, G, E]: each segment's merge weights, read at its first token
        y = self.merged_ffn(padded.to(self.experts.w_in.dtype), e.to(self.experts.w_in.dtype))
        if cache is not None:  # a prefill: the state a step goes on from (the last segment, maybe partial)
            last = T - (G - 1) * S  # tokens of the last segment
            cache.moe[self.layer] = (padded[:, -1, :last].float().sum(1), e[:, -1].float())  # [B, D], [B, E]
        return y.reshape(B, G * S, D)[:, :T].to(x.dtype), aux_loss, stats, state

    def decode_step(self, x, cache):
        """x [B, 1, D] at position cache.at: a new segment starts at a multiple of S, routed from the
        finished segment's sum; static shapes (a tensor position), one graph for every step."""
        total, e = cache.moe[self.layer]  # [B, D] the current segment's sum so far, [B, E] its weights
        start = (cache.at % self.segment == 0).view(1, 1)  # [1, 1]
        e = torch.where(start, self.router.weights(total / self.segment), e)
        total = torch.where(start, 0.0, total) + x[:, 0].float()
        cache.moe[self.layer] = (total, e)
        return self.merged_ffn(x.view(-1, 1, 1, x.size(-1)).to(self.experts.w_in.dtype),
                               e[:, None].to(self.experts.w_in.dtype)).view_as(x).to(x.dtype)


@register
class LoryRouter(LearnedRouter):
    """Lory's router: e = softmax(W h), h the previous segment's mean hidden state (LoryMoE). Its
    forward keeps the gate contract for what reads routers (the lab's analysis, the contract test):
    each token's row is its segment's merge weights, dense (every expert is merged: sparsity 0)."""

    name = 'lory'
    options = ('lory_segment',)  # no balance loss (Lory §2.2), no recurrent state
    stats = ('load', 'active', 'sparsity', 'entropy', 'gate_sum', 'logit_std', 'dropped')
    expert_parallel = False  # every expert's weights are merged on every rank
    top_k_max = 1  # one merged FFN a token: top_k must be 1 (and the active parameters are one expert's)
    block = LoryMoE

    def __init__(self, config, gru=None):
        super().__init__(config, None)
        self.segment = self.segment_length(config)

    @classmethod
    def segment_length(cls, config):
        """lory_segment, or 0: a quarter of block_size, ReMoE's 256 of 1,024 (4 segments a sequence)."""
        return config.lory_segment or max(1, config.block_size // 4)

    @classmethod
    def check(cls, config):
        S = cls.segment_length(config)
        if config.lory_segment < 0 or config.block_size % S:
            raise ValueError(f"lory_segment={config.lory_segment} must be a positive divisor of block_size="
                             f"{config.block_size} (0 = block_size / 4): training sequences hold whole segments")
        if config.top_k != 1 or config.expert_granularity != 1:
            raise ValueError(f"router='lory' runs one merged FFN a token: use top_k=1 (not {config.top_k}) and "
                             f"expert_granularity=1 (not {config.expert_granularity})")
        if config.recurrent_router:
            raise ValueError("recurrent_router=True with router='lory' is invalid: Lory routes segments, not tokens")
        if config.n_shared_expert:
            raise ValueError(f"n_shared_expert={config.n_shared_expert} with router='lory' is not supported: "
                             f"its experts are merged into one FFN per segment; use 0")

    @classmethod
    def ignored(cls, config):
        return {}

    def weights(self, h):
        """h [..., D] -> the merge weights softmax(W h) [..., E], in fp32."""
        logits, _ = self.logits(h, None)
        return logits.softmax(dim=-1)

    def forward(self, x, state=None, seq_len=None, measure=True, ids=None):
        """x [N, D], N = B*T -> each token's merge weights [N, E]: segment 1 uniform, segment k > 1
        softmax(W h_{k-1}) from the mean of segment k-1 (always whole: only the last may be partial).
        No aux loss (Lory §2.2)."""
        T, E, S = seq_len or x.size(0), self.n_expert, self.segment
        G = -(-T // S)  # segments, the last one possibly partial
        segments = F.pad(x.view(-1, T, x.size(-1)), (0, 0, 0, G * S - T)).view(-1, G, S, x.size(-1))  # [B, G, S, D]
        B = segments.size(0)
        logits, _ = self.logits(segments[:, :-1].mean(2), None)  # [B, G-1, E]
        uniform = logits.new_full((B, 1, E), 1 / E)
        e = torch.cat([uniform, logits.softmax(dim=-1)], 1)  # [B, G, E]
        gates = e[:, :, None].expand(B, G, S, E).reshape(B, G * S, E)[:, :T].reshape(-1, E)  # [N, E]
        zero = gates.new_zeros(())
        if not measure:
            return gates.to(x.dtype), zero, {}, state
        stats = routing_stats(gates, logits=logits.reshape(-1, E) if G > 1 else None)
        stats.setdefault('logit_std', zero)
        stats['dropped'] = zero
        return gates.to(x.dtype), zero, stats, state
