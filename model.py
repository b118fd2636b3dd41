"""
A GPT language model whose feed-forward layers are dense or Mixture-of-Experts.

The dense parts follow the modern small-LM recipe (LLaMA-style): RMSNorm, rotary position
embeddings (RoPE), causal scaled-dot-product attention, SwiGLU feed-forward, no biases, and an
output head tied to the token embedding. Every `moe_every`-th block replaces its SwiGLU with an
MoE block: a router (routers.py) makes a gate matrix, the experts (experts.py) consume it.

Legend for shape comments: B batch, T sequence, D model width (n_embd), N = B*T tokens,
E experts, K active experts per token, H hidden width of one FFN.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from experts import Experts, check_impl
from pairs import swiglu
import baselines  # noqa: F401 (registers the comparison routers in routers.ROUTERS)
import lory  # noqa: F401 (registers Lory, whose MoE block merges the experts' weights)
from routers import RMOE_FLOWS, RMOE_INITS, ROUTERS, Router, log_record, make_router
from softmax_routers import BALANCES, SCORES  # (and registers topk and prototype)


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304  # GPT-2's 50257 rounded up to a multiple of 64 for faster matmuls
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    ffn_hidden: int = 0  # H of each FFN (the dense MLP, or one expert); 0 = SwiGLU's 8/3 * n_embd
    rope_theta: float = 10000.0
    init_std: float = 0.02  # std of the normal init of every weight matrix (GPT-2: 0.02; ReMoE's scripts: 0.01)
    # Mixture of experts
    moe_every: int = 1  # every moe_every-th block is MoE; 1 = all of them, 0 = a dense model
    n_expert: int = 8
    top_k: int = 2
    router: str = 'topk'  # a name of routers.ROUTERS: 'topk', 'remoe', 'prototype', and baselines.py's
    recurrent_router: bool = False  # RMoE: logits from a GRU shared across layers
    rmoe_dim: int = 128  # RMoE: width p of the projector and of the GRU state
    rmoe_flow: str = 'pass'  # RMoE Table 5: 'pass' (RMoE), 'detach' (h_{i-1} detached), 'none' (NP: h_0 everywhere)
    rmoe_init: str = 'normal'  # RMoE: 'normal' (init_std, no biases) or 'torch' (PyTorch's own, biases: the paper's code)
    expert_impl: str = 'auto'  # 'loop' (reference), 'grouped', 'triton' (CUDA), 'auto' (triton on CUDA, else grouped)
    expert_granularity: int = 1  # G: E*G experts of hidden H/G, K*G active (same parameters)
    n_shared_expert: int = 0  # always-on experts per MoE layer beside the routed ones (DeepSeekMoE), each of hidden H/G
    capacity_factor: float = 0.0  # topk/prototype: slots per expert = cf * K * N / E; 0 = dropless
    balance: str = 'aux'  # 'aux' (topk: Switch loss; remoe: eq. 10-11), 'bias' (loss-free), 'none' (remoe: eq. 9's L1)
    aux_loss_coef: float = 0.01  # Switch balancing loss, per MoE layer (topk, prototype, balance='aux')
    bias_update_rate: float = 1e-3  # balance='bias': the bias step u per optimizer step (2408.15664: 1e-3)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss, per MoE layer (1e-3 is typical)
    # how the MoE layers' aux losses add up: 'sum' or 'mean' ('mean' = 'sum' / number of MoE layers)
    aux_loss_reduction: str = 'sum'  # Switch and z-loss: 'sum' as Megatron and ReMoE's top-k baseline,
    #                                  'mean' as RMoE's 0.91B runs (an L-fold weaker balancing gradient)
    remoe_l1_reduction: str = 'mean'  # ReMoE's L1: 'mean' as the paper's eq. 9-10, 'sum' as its code
    #                                   (an L-fold larger λ·L_reg: settles ~log_α(L) steps earlier)
    router_renorm: bool = False  # topk/prototype: rescale the kept probabilities to sum to 1
    score: str = 'softmax'  # topk/prototype: 'softmax' or 'sigmoid' (DeepSeek-V3: one sigmoid per expert)
    route_scale: float = 1.0  # topk/prototype: multiplies the kept gates (DeepSeek-V3's routed_scaling_factor)
    seq_aux_coef: float = 0.0  # topk/prototype: DeepSeek-V3's sequence-wise balance loss α, per MoE layer
    dense_grad: bool = False  # topk: Default MoE's dense router gradient (unchosen experts: an EMA of their output)
    dense_grad_beta: float = 0.9  # dense_grad: the EMA's decay per optimizer step
    dense_grad_forward: bool = False  # dense_grad: the defaults in the output too, not only in the router's gradient
    remoe_lambda0: float = 1e-8  # ReMoE: initial L1 coefficient λ (paper default)
    remoe_alpha: float = 1.2  # ReMoE: λ's multiplicative step (paper default)
    remoe_lambda_floor: bool = False  # ReMoE: λ never falls below remoe_lambda0 (see ReMoERouter.update)
    lory_segment: int = 0  # lory: tokens a segment (0 = block_size / 4, ReMoE's 256 of 1,024)
    hash_table: str = 'mod'  # hash: expert = id mod E ('mod', ReMoE's baseline) or a seeded random table ('random')
    hash_seed: int = 0  # hash_table='random': the seed of the table
    router_hidden: int = 0  # mlp: its hidden width (0 = RMoE's router's parameters); hyperrouter: H's (0 = 256)
    xmoe_dim: int = 16  # xmoe: the width the token is projected to before the cosine (RMoE's default)
    ec_capacity: float = 1.0  # expert_choice: each expert takes ec_capacity * T * K / E tokens of a sequence
    ec_eval: str = 'topk'  # expert_choice at evaluation: 'topk' (causal token choice) or 'choice' (leaky)
    sparsemixer_eps: float = 0.01  # sparsemixer: the mask keeps experts within a relative 2 eps of the largest logit

    def __post_init__(self):
        if self.ffn_hidden == 0:  # keep SwiGLU's 3 matrices at the FLOPs of a 4x GELU MLP
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)

    def is_moe(self, layer):
        return self.moe_every > 0 and layer % self.moe_every == self.moe_every - 1

    def n_moe_layers(self):
        return sum(self.is_moe(layer) for layer in range(self.n_layer))

    def moe_shape(self):
        """(E, K, H) of each MoE layer after fine-graining (ReMoE §4.3): G times more experts,
        each G times narrower, G times more of them active: parameters and FLOPs unchanged."""
        G = self.expert_granularity
        return self.n_expert * G, self.top_k * G, self.ffn_hidden // G

    def validate(self):
        """Raise ValueError with a one-line message naming the bad value and what is valid."""
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd', 'ffn_hidden'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if not self.init_std > 0:
            raise ValueError(f"init_std={self.init_std} must be > 0")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        if self.moe_every < 0:
            raise ValueError(f"moe_every={self.moe_every} must be >= 0 (0 means a dense model)")
        if self.moe_every == 0:
            return
        if self.n_moe_layers() == 0:
            raise ValueError(f"moe_every={self.moe_every} with n_layer={self.n_layer} makes no MoE layer (block i is "
                             f"MoE when (i + 1) % moe_every == 0): use moe_every <= n_layer, or 0 for a dense model")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not one of {', '.join(ROUTERS)}")
        check_impl(self.expert_impl)
        if self.n_expert < 1:
            raise ValueError(f"n_expert={self.n_expert} must be >= 1")
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_expert={self.n_expert}")
        if self.expert_granularity < 1 or self.ffn_hidden % self.expert_granularity:
            raise ValueError(f"expert_granularity={self.expert_granularity} must be a positive divisor "
                             f"of ffn_hidden={self.ffn_hidden}")
        if self.n_shared_expert < 0:
            raise ValueError(f"n_shared_expert={self.n_shared_expert} must be >= 0")
        if self.balance not in BALANCES:
            raise ValueError(f"balance={self.balance!r} is not one of {', '.join(BALANCES)}")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not one of {', '.join(SCORES)}")
        if not self.route_scale > 0:
            raise ValueError(f"route_scale={self.route_scale} must be > 0 (it multiplies the gates; 1 = none)")
        if self.seq_aux_coef < 0:
            raise ValueError(f"seq_aux_coef={self.seq_aux_coef} must be >= 0 (0 = no sequence-wise loss)")
        if not self.bias_update_rate > 0:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} must be > 0")
        for name in ('aux_loss_reduction', 'remoe_l1_reduction'):
            if getattr(self, name) not in ('sum', 'mean'):
                raise ValueError(f"{name}={getattr(self, name)!r} is not 'sum' or 'mean'")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be >= 0 (0 means dropless)")
        ROUTERS[self.router].check(self)  # its own checks (configurator: the options it does not read)
        if self.recurrent_router and self.rmoe_dim < 1:
            raise ValueError(f"rmoe_dim={self.rmoe_dim} must be a positive integer")
        if self.rmoe_flow not in RMOE_FLOWS:
            raise ValueError(f"rmoe_flow={self.rmoe_flow!r} is not one of {', '.join(RMOE_FLOWS)}")
        if self.rmoe_init not in RMOE_INITS:
            raise ValueError(f"rmoe_init={self.rmoe_init!r} is not one of {', '.join(RMOE_INITS)}")


def rope_tables(head_size, block_size, theta):
    """RoPE's rotation (RoFormer eq. 34) of the pairs (x_i, x_{i+hs/2}) as two tables [T, hs]:
    cos = [cos, cos] and sin = [-sin, sin], the halves side by side, so that apply_rope is two
    products and a sum over whole heads."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2).float() / head_size)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # [T, hs/2]
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([-angles.sin(), angles.sin()], -1)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hs/2}) of every head by position-dependent angles. x: [B, nh, T, hs].
    With the halves swapped (roll by hs/2) the rotation is x1 cos - x2 sin | x2 cos + x1 sin,
    the same numbers, bit for bit, as writing the halves out, in four ops instead of eight."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer=0):
        super().__init__()
        self.n_head, self.layer = config.n_head, layer  # layer: its slot in a KVCache (sample.py)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, T, D = x.shape
        qk, v = self.c_attn(x).split([2 * D, D], dim=2)
        # q and k rotated in one pass, as 2 * n_head heads side by side (one op per step instead of two)
        qk = apply_rope(qk.view(B, T, 2 * self.n_head, D // self.n_head).transpose(1, 2), cos, sin)
        q, k = qk.split(self.n_head, dim=1)  # [B, nh, T, hs] each
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
        mask = None  # causal: training, and a prefill (it starts at position 0)
        if cache is not None:  # generating: attend to the cached positions too
            k, v, mask = cache.append(self.layer, k, v)  # a step: the whole buffer, the positions held unmasked
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # [B, nh, T, hs]
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, D))


class MLP(nn.Module):
    """Dense SwiGLU (Shazeer 2020). Gate and up projections share one matmul, like the experts."""

    def __init__(self, n_embd, hidden):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 2 * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(swiglu(self.c_fc(x)))


class MoE(nn.Module):
    """y_n = sum_e gates[n, e] * FFN_e(x_n) (+ the shared experts' output): the router decides the
    gates, the experts compute."""

    def __init__(self, config, gru=None, layer=0):
        super().__init__()
        E, _, H = config.moe_shape()
        self.router = make_router(config, gru)
        self.experts = Experts(E, config.n_embd, H, config.expert_impl, config.init_std)
        # DeepSeekMoE's shared experts: S SwiGLUs every token uses, ungated. Their sum is one SwiGLU
        # of hidden S*H (the S hidden blocks side by side), so they are one dense MLP here.
        S = config.n_shared_expert
        self.shared = MLP(config.n_embd, S * H) if S else None

    def forward(self, x, state, cache=None, ids=None):
        """cache: generating with sample.generate's KVCache (eval mode), which reads the output only: the
        router skips its losses and statistics, and one new position per sequence on a CPU takes the
        experts' decode path (experts.py: a few pairs, one at a time)."""
        generating = cache is not None
        B, T, D = x.shape
        x = x.view(B * T, D)
        # T: the sequence-wise balance loss needs the sequences (T varies when generating)
        ids = ids.reshape(B * T) if self.router.needs_ids else None  # [N] token ids, for Hash routing
        gates, aux_loss, stats, state = self.router(x, state, seq_len=T, measure=not generating, ids=ids)  # [N, E]
        decode = generating and T == 1 and x.device.type == 'cpu'  # (compiled: as one custom op)
        if self.router.dense_grad and not generating:  # Default MoE (TopKRouter): the EMA's data out
            y, stats['expert_sum'] = self.experts(x, gates, sums=True)  # [N, D], [E, D] fp32
            stats['expert_count'] = (gates > 0).sum(0).float()  # [E] the tokens each expert ran
        else:
            y = self.experts(x, gates, decode=decode)  # [N, D]
        if self.router.dense_grad:  # ... and its defaults in: by default in the router's gradient only
            d = stats.pop('default_out').to(y.dtype)  # [N, D]
            y = y + (d if self.router.dense_grad_forward else d - d.detach())  # d - d is exactly 0: y is top-k's
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, D), aux_loss, stats, state


class Block(nn.Module):
    def __init__(self, config, layer, gru=None):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        # the MoE block a router asks for (Lory merges weights: lory.LoryMoE), else the gate contract's MoE
        moe = ROUTERS[config.router].block or MoE if config.is_moe(layer) else None
        self.mlp = moe(config, gru, layer) if moe else MLP(config.n_embd, config.ffn_hidden)

    def forward(self, x, cos, sin, state, cache=None, ids=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache)
        if not isinstance(self.mlp, MLP):  # an MoE block
            y, aux_loss, stats, state = self.mlp(self.ln_2(x), state, cache=cache, ids=ids)
        else:  # no aux loss, no routing stats
            y, aux_loss, stats = self.mlp(self.ln_2(x)), None, {}
        return x + y, aux_loss, stats, state


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        # RMoE: one GRU cell, shared by the routers of all MoE layers (like tied embeddings, the
        # same module appears in each; parameters() counts it once)
        gru = nn.GRUCell(config.rmoe_dim, config.rmoe_dim) if config.recurrent_router else None
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i, gru) for i in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: scale the init of the projections that write into the residual stream
            if name.endswith('c_proj.weight') or name.endswith('experts.w_out'):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        elif isinstance(module, nn.GRUCell) and self.config.rmoe_init == 'torch':
            module.reset_parameters()  # PyTorch's U(±1/sqrt(p)), weights and biases (RMoE's enwik8 runs)
        elif isinstance(module, nn.GRUCell):  # RMoE's Megatron runs: the standard init, std 0.02
            nn.init.normal_(module.weight_ih, mean=0.0, std=self.config.init_std)
            nn.init.normal_(module.weight_hh, mean=0.0, std=self.config.init_std)
            nn.init.zeros_(module.bias_ih)
            nn.init.zeros_(module.bias_hh)
        elif isinstance(module, Router) and getattr(module, 'gru', None) is not None and \
                self.config.rmoe_init == 'torch':
            # apply() visits children first: this undoes the normal init just given to its two linears
            module.proj.reset_parameters()  # U(±1/sqrt(fan_in)), weight and bias
            if isinstance(module.w_g, nn.Linear):  # (a baseline's own logit map keeps its init)
                module.w_g.reset_parameters()

    def num_params(self, active=False):
        """Parameter count; the tied embedding counts once (it is the output head's matmul).
        active=True counts only what one token uses: K of the E routed experts in each MoE layer
        (the shared experts count whole in both)."""
        n = sum(p.numel() for p in self.parameters())
        if active:  # ReMoE's K is an average, held there by its controller
            E, K, _ = self.config.moe_shape()
            for block in self.transformer.h:
                if not isinstance(block.mlp, MLP):
                    expert_params = sum(p.numel() for p in block.mlp.experts.parameters())
                    n -= expert_params * (E - K) // E
        return n

    @torch.no_grad()
    def update_routers(self, load, expert_sum=None, expert_count=None):
        """Once per optimizer step: routers that adapt online (ReMoE's λ, the balancing bias) see
        load [L_moe, E], the fraction of tokens that chose each expert, measured over that step's
        training forwards and averaged over micro-steps and ranks (info['load'] of each forward).
        ReMoE's sparsity (eq. 8) is the fraction of zero gates over all MoE layers: 1 - mean load.
        Default MoE (dense_grad): expert_sum [L_moe, E, D] and expert_count [L_moe, E], info's
        'expert_sum' and 'expert_count' summed (not averaged) over micro-steps and ranks."""
        routers = self.routers()
        assert load.shape == (len(routers), self.config.moe_shape()[0]), f"load {tuple(load.shape)}: [L_moe, E]"
        sparsity = 1 - load.float().mean()
        for router, layer_load in zip(routers, load.float()):
            router.update(sparsity, layer_load)
        if expert_sum is not None:
            for router, layer_sum, layer_count in zip(routers, expert_sum, expert_count):
                router.update_defaults(layer_sum, layer_count)

    def routers(self):
        """The router of every MoE layer, in order."""
        return [block.mlp.router for block in self.transformer.h if not isinstance(block.mlp, MLP)]

    def routing_log(self, info):
        """What the training log records of a step's routing: every MoE layer's statistics (from
        the forward's info) and the routers' online state, the same in every layer (ReMoE's λ)."""
        routers = self.routers()
        return {**log_record(info), **routers[0].log_state()} if routers else {}

    def router_lambda(self):
        """ReMoE's λ, or None for routers without one."""
        routers = self.routers()
        return routers[0].log_state().get('lambda') if routers else None

    def forward(self, idx, targets=None, cache=None):
        """idx [B, T] token ids -> logits, loss (lm + aux, None without targets), info (dict of tensors).

        info holds 'lm_loss', 'aux_loss' and, for each router statistic, a tensor stacked over the
        MoE layers (e.g. 'load' [L_moe, E]), so that one compiled graph returns everything logged.
        cache: sample.KVCache when generating; idx are then the positions after the cache's `pos`.
        """
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0  # the position of idx[:, 0]
        assert pos + T <= self.config.block_size, f"sequence length {pos + T} > block_size {self.config.block_size}"
        x = self.transformer.wte(idx)  # [B, T, D]
        if pos > 0 and T == 1:  # one generated position, at a tensor index: one graph for every step (KVCache)
            cos, sin = self.rope_cos[cache.at], self.rope_sin[cache.at]
        else:  # training, or a prefill
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]  # RoPE angles of these positions
        aux_losses, stats, state = [], [], None  # state: RMoE's, from layer to layer of each position
        for block in self.transformer.h:
            x, layer_aux, layer_stats, state = block(x, cos, sin, state, cache, ids=idx)
            if layer_aux is not None:  # an MoE block
                aux_losses.append(layer_aux)
                stats.append(layer_stats)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        info = {k: torch.stack([s[k] for s in stats]) for k in (stats[0] if stats else {})}
        if targets is None:  # inference: only the last position's logits are needed
            return self.lm_head(x[:, -1:, :]), None, info
        logits = self.lm_head(x)
        lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        # A dense model adds nothing: in torch 2.13, compiling `loss + 0` next to a returned
        # loss.detach() yields a loss without grad_fn (test_train checks the dense model compiles)
        aux_loss = sum(aux_losses) if aux_losses else None
        # ... nor does a model whose routers have no loss (Hash, Lory: a constant 0 without grad_fn)
        loss = lm_loss + aux_loss if aux_losses and aux_loss.requires_grad else lm_loss
        info.update(lm_loss=lm_loss.detach(),
                    aux_loss=aux_loss.detach() if aux_losses else torch.zeros((), device=idx.device))
        return logits, loss, info

    def configure_optimizer(self, learning_rate, weight_decay, betas, fused=None, router_lr_scale=1.0,
                            decay_router=True):
        """AdamW with weight decay on weight matrices only: norms' gains are 1-d and are not decayed.
        The routers may have a learning rate (router_lr_scale x learning_rate) and a weight decay
        (none when decay_router=False) of their own. Each group's 'lr_scale' multiplies the
        learning rate the training loop sets. fused=None: torch's fused AdamW (one kernel over all
        parameters) where it has one, on CUDA and on the CPU (there 2.5-4x faster a step than the
        foreach one for the CPU configs: docs/benchmarks.md), else the foreach one."""
        if fused is None:
            fused = all(p.device.type in ('cuda', 'cpu') for p in self.parameters())
        groups = {}  # (weight decay, lr scale) -> parameters
        for name, p in self.named_parameters():
            router = '.router.' in name
            decay = weight_decay if p.dim() >= 2 and (decay_router or not router) else 0.0
            groups.setdefault((decay, router_lr_scale if router else 1.0), []).append(p)
        return torch.optim.AdamW([{'params': ps, 'weight_decay': wd, 'lr_scale': scale}
                                  for (wd, scale), ps in groups.items()], lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self):
        """Training FLOPs per token on ACTIVE parameters: 6N + attention (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_params(active=True) + 12 * c.n_layer * c.n_embd * c.block_size

    def step_memory(self, batch_size, bytes_per_value):
        """A rough estimate of the bytes one training step of batch_size rows holds: weights,
        gradients and AdamW's two moments in fp32 (16 bytes a parameter), plus the activations kept
        for the backward, ~34 values per token and layer of width D (Korthikanti et al. 2022, with
        flash attention) and the logits with their gradient."""
        c = self.config
        tokens = batch_size * c.block_size
        activations = tokens * (34 * c.n_layer * c.n_embd + 2 * c.vocab_size) * bytes_per_value
        return 16 * self.num_params() + activations


def device_peak_flops(device):
    """Peak FLOP/s used for MFU. Known GPUs: the datasheet's dense bf16 number. Anything else
    (a CPU): a measured fp32 matmul, so MFU reads as a fraction of what this machine can do."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, flops in (('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L4', 121e12)):
            if key in name:
                return flops
    n = 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float('inf')
    for _ in range(10):  # the fastest of several: a busy machine slows some repetitions, not all
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
