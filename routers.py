"""
Routers: each turns the token states of one MoE layer into a dense gate matrix.

The one contract of this repo (DESIGN.md):

    router(x [N, D], state) -> gates [N, E], aux_loss (scalar), stats (dict of tensors), state

`gates[n, e]` is the weight of expert e in token n's output, zero where the expert is inactive.
experts.py consumes that matrix and never needs to know which router made it, so a router is free
to choose any number of experts per token. `aux_loss` is already multiplied by its coefficient;
the model adds it to the language-model loss. `state` is threaded from one MoE layer to the next
(a recurrent router uses it; the others pass it through untouched).

Legend for shape comments: N tokens, E experts, K active experts per token, D model width.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ('topk',)


def switch_balance_loss(probs, gates, top_k):
    """Switch Transformer eq. 4, generalised to top-k as in GShard / DeepSeekMoE.

    loss = E * sum_e f_e * P_e, with f_e the fraction of the N*K assignments that went to
    expert e (a count: no gradient) and P_e the mean router probability of e (differentiable).
    Dividing the counts by N*K rather than N makes the minimum 1 (uniform routing) for every k.
    """
    N, E = probs.shape
    f = (gates > 0).sum(0).float() / (N * top_k)  # [E], detached by construction
    P = probs.mean(0)  # [E]
    return E * (f * P).sum()


def z_loss(logits):
    """ST-MoE eq. 5: mean squared log-partition, keeps router logits small (bf16-safe)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def routing_stats(probs, gates):
    """Routing health, logged next to the loss. All tensors, so the model compiles in one graph."""
    active = (gates > 0).float()  # [N, E]
    load = active.mean(0)  # [E] fraction of tokens that use each expert
    entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()
    return {
        'load': load,  # per-expert load, for min/max/CV
        'active': active.sum(-1).mean(),  # mean experts per token
        'entropy': entropy,  # mean router entropy (nats); log(E) is uniform
    }


class TopKRouter(nn.Module):
    """The classic baseline: softmax over all experts, keep the K largest (GShard, Switch).

    The kept probabilities are used as gates as they are by default, so with K = 1 the router
    still receives a language-model gradient (ROUTERS.md pitfall 10); `router_renorm=True`
    rescales them to sum to 1 per token, as Mixtral does.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.top_k
        self.renorm = config.router_renorm
        self.aux_loss_coef = config.aux_loss_coef
        self.z_loss_coef = config.z_loss_coef
        self.w_g = nn.Linear(config.n_embd, config.n_expert, bias=False)

    def forward(self, x, state=None):
        # router math in fp32: under bf16 autocast near-ties in the softmax would flip experts
        logits = self.w_g(x).float()  # [N, E]
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, K]
        if self.renorm:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(1, top_i, top_p)  # [N, E], K non-zeros per row
        aux_loss = self.aux_loss_coef * switch_balance_loss(probs, gates, self.top_k)
        if self.z_loss_coef > 0:
            aux_loss = aux_loss + self.z_loss_coef * z_loss(logits)
        return gates.to(x.dtype), aux_loss, routing_stats(probs, gates), state


def make_router(config):
    """The router named by `config.router`; GPTConfig.validate has checked the name."""
    return {'topk': TopKRouter}[config.router](config)
