"""
Routers: each turns the token states of one MoE layer into a dense gate matrix.

The one contract of this repo, between routers and experts:

    router(x [N, D], state, seq_len=T, measure=True, ids=None) -> gates [N, E], aux_loss, stats, state

`gates[n, e]` is the weight of expert e in token n's output, zero where the expert is inactive.
experts.py consumes that matrix and never needs to know which router made it, so a router is free
to choose any number of experts per token. `aux_loss` is already multiplied by its coefficient;
the model adds it to the language-model loss. `state` is threaded from one MoE layer to the next
(RMoE's GRU state); `seq_len` is T, the length of the sequences that x's N = B*T rows come in;
`ids` [N] are the tokens' ids, for a router that routes on them (Hash). Generating with a KV cache
asks for the gates alone (`measure=False`): aux_loss is then 0 and stats holds nothing the log
reads (for one token their cost is larger than the routing's own).

A router is one class, registered in ROUTERS under its name (`router=` in a config), and the rest of
the repo reads everything about it off that class: the options it reads (any other router option
is a one-line error), its own checks, its log statistics, its lab kind, whether it has learned
parameters, needs token ids, or depends on the other sequences of its batch. Three bases:
- Router: the contract; no parameters (Hash routes on ids alone).
- LearnedRouter: learned logits, from a linear map of x or from RMoE's GRU that carries a per-token
  routing state from layer to layer (`recurrent_router=True`). ReMoE: ReLU of them, a variable
  number of experts held at K on average by an adaptive L1 penalty.
- SoftmaxRouter (softmax_routers.py): the softmax family, 'topk' (keep K) and 'prototype' (K groups,
  top-1 in each), and their knobs: balancing, scores, renormalisation and scale, capacity.
The routers the seed papers compare against are in baselines.py and lory.py, registered the same way.

Legend for shape comments: N tokens, E experts, K active experts per token, D model width,
p RMoE's recurrent width.
"""

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

RMOE_FLOWS = ('pass', 'detach', 'none')  # RMoE Table 5: what of h_{i-1} reaches layer i (LearnedRouter.logits)
RMOE_INITS = ('normal', 'torch')  # the recurrent router's init (GPT._init_weights)


def remoe_l1(gates, top_k, balanced=True):
    """ReMoE eq. 10-11 for one layer: (1/N) sum_n sum_e f_e * R_ne, with f_e = E/(K*N) * (tokens
    using e), the load relative to the ideal K/E, held constant (a count: no gradient). Overloaded
    experts are pushed to zero harder. Its minimum is 0 (all gates zero), which is why its
    coefficient cannot be fixed and ReMoE adapts it online. balanced=False: the plain L1 of eq. 9,
    every f_e = 1 (§5.2's ReMoE without load balancing)."""
    N, E = gates.shape
    if not balanced:
        return gates.sum() / N  # eq. 9: gates are >= 0, so their sum is the L1 norm
    f = (gates > 0).sum(0).float() * E / (top_k * N)  # [E]
    return (f * gates).sum() / N


def routing_stats(gates, probs=None, logits=None):
    """Routing health, logged next to the loss. All tensors, so the model compiles in one graph.
    gates: as the router made them (after renormalisation, before capacity drops); probs: the
    softmax routers' probabilities ([N, E], or [N, K, m] per prototype group); logits [N, E]."""
    active = (gates > 0).float()  # [N, E]
    softmax = probs is not None
    if probs is None:  # ReLU routing has no probabilities: use each token's normalised gates
        probs = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)
    stats = {
        'load': active.mean(0),  # [E] fraction of tokens that use each expert
        'active': active.sum(-1).mean(),  # mean experts per token
        'sparsity': 1 - active.mean(),  # fraction of zero gates (ReMoE eq. 8, one layer)
        'entropy': -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean(),  # nats; log(E) is uniform
        'gate_sum': gates.sum(-1).mean(),  # the scale of the MoE output: 1 under renormalisation
    }
    if logits is not None:  # the router's gain: softmax(z) is near uniform while this is << 1
        stats['logit_std'] = logits.float().std(-1).mean()  # over each token's experts, mean over tokens
    if softmax:
        # RMoE Table 8: outer balance OB = the probability mass of the kept experts (before any
        # renormalisation), inner balance IB = the median over tokens of top-1 / top-2 probability
        # (prototype: the sum of the K groups' kept probabilities, up to K)
        stats['kept_prob'] = (probs * active.view_as(probs)).flatten(1).sum(-1).mean()
        if probs.size(-1) > 1:
            top2 = probs.topk(2, dim=-1).values  # [..., 2]
            stats['top1_top2'] = (top2[..., 0] / top2[..., 1].clamp_min(1e-12)).flatten().median()
    return stats


# Every routing statistic a router may return, and its name in the training log (lists per MoE layer).
# A statistic not here is an error in log_record, not a silent loss (a test runs every router).
LOGGED = {'sparsity': 'sparsity_per_layer', 'active': 'active_experts', 'entropy': 'router_entropy',
          'gate_sum': 'gate_sum',  # mean sum of a token's gates: the MoE output's scale
          'logit_std': 'router_logit_std',
          'kept_prob': 'kept_prob', 'top1_top2': 'top1_top2',  # RMoE Table 8's OB and IB, softmax routers
          'ema_norm': 'default_norm', 'dropped': 'dropped', 'bias_spread': 'bias_spread',
          'unrouted': 'unrouted',  # Expert Choice: tokens that no expert took
          'resampled': 'sampled_not_argmax', 'heun_c': 'heun_scale',  # SparseMixer-v2's sampling, training only
          'load': 'load', 'bias': 'bias'}  # [L, E]: each layer's values, with load's spread below
NOT_LOGGED = ('lm_loss', 'aux_loss', 'expert_sum', 'expert_count')  # the model's own; Default MoE's EMA data


def log_record(info):
    """One step's routing health for the training log, from the model's info dict (each statistic
    of a router's forward stacked over the MoE layers: [L] or [L, E]). Lists are per MoE layer."""
    unknown = set(info) - set(LOGGED) - set(NOT_LOGGED)
    if unknown:
        raise KeyError(f"routing statistics {sorted(unknown)} have no place in the log: add them to routers.LOGGED")
    load = info['load'].float()  # [L, E] fraction of tokens that use each expert
    mean = load.mean(-1).clamp_min(1e-9)
    r = lambda t: [round(v, 4) for v in t.tolist()]
    record = {LOGGED[key]: (r(v.float()) if v.dim() == 1 else [r(layer) for layer in v.float()])
              for key, v in info.items() if key in LOGGED}
    record.update(load_min=r(load.min(-1).values / mean),  # 1.0 everywhere = perfectly balanced
                  load_max=r(load.max(-1).values / mean), load_cv=r(load.std(-1, correction=0) / mean))
    return record


# -----------------------------------------------------------------------------
# the registry: a router is one class, and everything about it is read off that class

ROUTERS = {}  # name -> class; baselines.py adds the routers the seed papers compare against
MOE_OPTIONS = ('n_expert', 'top_k', 'router', 'expert_impl', 'expert_granularity', 'n_shared_expert',
               'router_lr_scale', 'decay_router')  # read by every MoE model, whatever its router
RECURRENT_OPTIONS = ('recurrent_router', 'rmoe_dim', 'rmoe_flow', 'rmoe_init')  # RMoE's logits (LearnedRouter)


def register(cls):
    """Class decorator: adds a router to ROUTERS under its `name`."""
    assert cls.name and cls.name not in ROUTERS, cls.name
    ROUTERS[cls.name] = cls
    return cls


def router_options():
    """Every option that some router reads: the ones a config may set only for a router that reads it."""
    return tuple(dict.fromkeys(key for cls in ROUTERS.values() for key in cls.options))


class Router(nn.Module):
    """What every router shares: the contract, and what the rest of the repo reads off its class.

    forward(x [N, D], state, seq_len=T, measure=True, ids=None) -> gates [N, E], aux_loss, stats, state
    (ids [N]: the tokens' ids, for the routers that route on them; needs_ids says which)."""

    name = ''  # the value of config.router that selects it
    options = ()  # the config keys it reads beyond MOE_OPTIONS: any other router option is an error
    stats = ()  # the statistics its training forward returns (log_record's keys; a test checks them)
    learned = True  # it has learned parameters (a router without must build none: DDP rejects unused ones)
    needs_ids = False  # it routes on the token ids, which the MoE block then passes
    batch_independent = True  # a token's gates depend on its own sequence only (2 processes train as 1)
    dense_grad = False  # Default MoE's defaults in the output (TopKRouter)
    top_k_max = None  # the most experts it can give a token (Hash: 1); None = n_expert
    expert_parallel = True  # it runs with ep_size > 1 (Lory merges every expert on every rank: not)
    block = None  # the MoE block it needs, if not model.MoE's gate contract (Lory: lory.LoryMoE)

    def __init__(self, config):
        super().__init__()
        self.n_expert, self.top_k, _ = config.moe_shape()
        self.n_moe_layers = config.n_moe_layers()

    @classmethod
    def check(cls, config):
        """Its own config checks: raise ValueError with one line naming the value and the fix."""

    @classmethod
    def ignored(cls, config):
        """{key: why} of the options it reads only under some setting (get: configs may predate a key)."""
        return {}

    @classmethod
    def kind(cls, run):
        """Its lab kind, the parts of a run's config that differ from the defaults, in a fixed order."""
        return [cls.name] + (['shared'] if run.get('n_shared_expert', 0) else [])

    @torch.no_grad()
    def update(self, sparsity, load):
        """Called once per optimizer step with what that step's training forwards measured over all
        micro-steps and ranks: sparsity (0-d, over every MoE layer) and load [E], the fraction of
        tokens that chose each expert of this layer (before capacity drops). On the device: no host sync."""

    def log_state(self):
        """The router's online state for the training log that is the same in every layer
        (ReMoE's λ); {} for routers that keep none. Per-layer state goes in the forward's stats."""
        return {}

    def score_variants(self):
        """Other ways to score the same weights, each {name: {router attribute: value}}: the final score
        is also taken with those attributes set on every router and logged as val_loss_<name>
        (evaluate.score_variants). None by default; Expert Choice scores with its training rule too."""
        return {}

    def console(self, record):
        """What the console line shows of a logged step's record (log_record's, over all MoE layers):
        what a user watches for this router. By default the load's spread over the experts."""
        return f"load cv {sum(record['load_cv']) / len(record['load_cv']):.2f}"

    def _apply(self, fn, recurse=True):
        # online controller state (ReMoE's λ, the balancing bias) stays fp32 whatever the model is
        # cast to: bf16 would round away the controllers' small steps
        keep = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buf in keep.items():
            setattr(self, name, buf.to(getattr(self, name).device))
        return self


class LearnedRouter(Router):
    """A router whose logits are learned: a linear map of x, or RMoE's GRU that carries a per-token
    routing state from layer to layer (`recurrent_router=True`, RMoE eq. 4-6)."""

    options = RECURRENT_OPTIONS
    stats = ('load', 'active', 'sparsity', 'entropy', 'gate_sum', 'logit_std', 'dropped')

    def __init__(self, config, gru=None):
        super().__init__(config)
        if config.recurrent_router:  # RMoE eq. 4-6
            # rmoe_init='torch' is the paper's enwik8 code: PyTorch's own init and biases on both linears
            bias = config.rmoe_init == 'torch'
            self.proj = nn.Linear(config.n_embd, config.rmoe_dim, bias=bias)  # per layer: D -> p
            self.gru = gru  # ONE GRU cell shared by all layers (the same module object in each)
            self.w_g = self.make_logits(config, config.rmoe_dim, bias)  # per layer: p -> E
            self.flow = config.rmoe_flow
        else:
            self.gru = None
            self.w_g = self.make_logits(config, config.n_embd, bias=False)

    def make_logits(self, config, in_dim, bias):
        """The map [N, in_dim] -> logits [N, E]: linear here; baselines.py's routers make others
        (an MLP, cosine similarities, a frozen or generated matrix). in_dim: D, or RMoE's p."""
        return nn.Linear(in_dim, self.n_expert, bias=bias)

    @classmethod
    def ignored(cls, config):
        if not config.get('recurrent_router', False):
            return {key: 'without recurrent_router=True' for key in RECURRENT_OPTIONS[1:]}
        return {}

    @classmethod
    def kind(cls, run):
        parts = [cls.name]
        if run.get('recurrent_router'):
            parts += ['recurrent'] + {'pass': [], 'detach': ['detach'], 'none': ['np']}[run.get('rmoe_flow', 'pass')]
        return parts + (['shared'] if run.get('n_shared_expert', 0) else [])

    def logits(self, x, state):
        """x [N, D] -> logits [N, E] in fp32 (or fp64), and the routing state for the next MoE layer.

        The router computes in its parameters' dtype with autocast off: fp32 in training under bf16
        autocast, where a bf16 matmul would round near-tied experts into flips. (A model cast to
        bf16 as a whole routes in bf16, its logits upcast.)"""
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(next(itertools.chain(self.w_g.parameters(), self.w_g.buffers())).dtype)
            if self.gru is not None:
                # RMoE eq. 5: h_i = GRU(Proj_i(x_i), h_{i-1}), h_0 = 0 (state None). rmoe_flow='pass' (RMoE):
                # never detached, so later layers' routing losses train earlier layers' projectors (the
                # "recurrent gradient"). RMoE Table 5's ablations: 'detach' passes h_{i-1} forward without
                # that gradient; 'none' ("NP") starts every layer from h_0 = 0: a stateless GRU.
                if state is not None and self.flow != 'pass':
                    state = state.detach() if self.flow == 'detach' else None
                state = self.gru(self.proj(x), state)  # [N, p]
                x = state
            logits = self.w_g(x)
        return (logits.float() if logits.element_size() < 4 else logits), state


@register
class ReMoERouter(LearnedRouter):
    """ReMoE (Wang et al., ICLR 2025): gates = ReLU(x W). No softmax, no top-k, no normalisation:
    an expert is active exactly where its gate is positive, so the output is continuous in W.

    Compute is held at K of E experts on average by the load-balanced L1 penalty (eq. 10-11) whose
    coefficient λ follows a multiplicative controller (eq. 7) towards the target sparsity 1 - K/E.
    λ is an fp32 buffer outside autograd: saved in checkpoints, kept in fp32 when the model is cast,
    changed only by `update`, which the training loop calls once per optimizer step.
    """

    name = 'remoe'
    options = LearnedRouter.options + ('balance', 'remoe_lambda0', 'remoe_alpha', 'remoe_lambda_floor',
                                       'remoe_l1_reduction')

    @classmethod
    def kind(cls, run):
        parts = super().kind(run)  # [name, recurrent..., shared?]: 'noaux' (the plain L1) before 'shared'
        shared = parts[-1:] if parts[-1] == 'shared' else []
        return parts[:len(parts) - len(shared)] + (['noaux'] if run.get('balance', 'aux') == 'none' else []) + shared

    @classmethod
    def check(cls, config):
        # the softmax family's knobs would be silently ignored: they are errors that say why
        if config.capacity_factor > 0:
            raise ValueError(f"capacity_factor={config.capacity_factor} with router='remoe' is invalid: "
                             f"ReLU routing has no fixed number of experts to cap; use 0")
        if config.router_renorm:
            raise ValueError("router_renorm=True with router='remoe' is invalid: ReLU gates are never "
                             "normalised (ReMoE §3.2)")
        if config.balance == 'bias':
            raise ValueError("balance='bias' with router='remoe' is invalid: ReMoE balances through its "
                             "load-weighted L1 (eq. 10-11, balance='aux'; 'none' is the plain L1 of eq. 9); "
                             "bias balancing is for topk and prototype")
        if config.score != 'softmax':
            raise ValueError(f"score={config.score!r} with router='remoe' is invalid: ReLU routing has no scores "
                             f"to choose from (its gates are relu(x W)); use router='topk' for sigmoid scoring")
        if not config.remoe_alpha > 1:
            raise ValueError(f"remoe_alpha={config.remoe_alpha} must be > 1 (λ's multiplicative step, ReMoE eq. 7)")
        if not config.remoe_lambda0 > 0:
            raise ValueError(f"remoe_lambda0={config.remoe_lambda0} must be > 0 (λ's start, ReMoE eq. 7)")

    def __init__(self, config, gru=None):
        super().__init__(config, gru)
        self.alpha = config.remoe_alpha
        self.target_sparsity = 1 - self.top_k / self.n_expert  # the same for every granularity
        self.register_buffer('lam', torch.tensor(config.remoe_lambda0, dtype=torch.float32))
        # Without the floor λ may fall as far as float32's smallest normal number: below it, in the
        # denormals, x1.2 rounds back to the same value (2.8e-45 * 1.2 = 2.8e-45) and the controller
        # could never climb again. At 1.2e-38 the penalty is zero for every purpose, as eq. 7 intends.
        self.lambda_min = config.remoe_lambda0 if config.remoe_lambda_floor else torch.finfo(torch.float32).tiny
        # eq. 9-10 average the L1 over the L MoE layers; the reference code sums them
        self.l1_scale = 1 / self.n_moe_layers if config.remoe_l1_reduction == 'mean' else 1.0
        # balance='none': the plain L1 of eq. 9, which still holds the sparsity but not the load (§5.2)
        self.balanced = config.balance == 'aux'

    def forward(self, x, state=None, seq_len=None, measure=True, ids=None):
        logits, state = self.logits(x, state)  # [N, E]
        gates = F.relu(logits)  # ReMoE eq. 5
        if not measure:
            return gates.to(x.dtype), logits.new_zeros(()), {}, state
        aux_loss = self.lam * self.l1_scale * remoe_l1(gates, self.top_k, self.balanced)  # eq. 6, and 10 or 9
        stats = routing_stats(gates, logits=logits)
        stats['dropped'] = gates.new_zeros(())  # ReLU routing is dropless
        return gates.to(x.dtype), aux_loss, stats, state

    @torch.no_grad()
    def update(self, sparsity, load):
        # eq. 7: λ <- λ * α^sign(S* - S). Like the reference code, a step exactly on target
        # divides, so λ always moves by exactly α or 1/α. On the device: no host sync per step.
        # The floor (remoe_lambda_floor, opt-in): below λ0 the L1 term is as negligible as in stage I,
        # but a λ that fell 30 orders of magnitude needs ~400 steps of x1.2 to matter again, while the
        # sparsity drifts; with the floor it climbs from λ0 (README: ReMoE at small scale).
        self.lam.mul_(torch.where(torch.as_tensor(sparsity) < self.target_sparsity, self.alpha, 1 / self.alpha))
        self.lam.clamp_(min=self.lambda_min)

    def log_state(self):
        return {'lambda': self.lam.item()}

    def console(self, record):
        # the controller at work (eq. 7): the sparsity it saw (train.py's, over micro-steps and ranks; else
        # the mean of this forward's layers) against its target, and λ
        per_layer = record['sparsity_per_layer']
        sparsity = record.get('sparsity', sum(per_layer) / len(per_layer))
        return (f"sparsity {sparsity:.3f} (target {self.target_sparsity:.3f}), λ {record['lambda']:.2e}, "
                f"load cv {sum(record['load_cv']) / len(record['load_cv']):.2f}")


def make_router(config, gru=None):
    """The router named by `config.router` (GPTConfig.validate has checked the name and options).
    `gru` is the GRU cell shared by all layers when config.recurrent_router is set."""
    cls = ROUTERS[config.router]
    return cls(config, gru) if issubclass(cls, LearnedRouter) else cls(config)
