"""
Numbers about trained runs, read from what train.py leaves in out_dir: log.jsonl and ckpt.pt.
lab.report tabulates them and lab.plots draws them; both work on any train.py run.

From the log (every logged step and evaluation):
    final val loss (overall and per domain), tokens/s, expert load per layer and dead experts,
    and ReMoE's controller: when the sparsity settles in its band, how tightly it stays there,
    how low λ falls after the overshoot; the softmax routers' gate entropy (RMoE Fig. 4) and their
    inner and outer balance (RMoE Table 8), as logged during training.
From the checkpoint's weights: how alike each layer's experts are (RMoE Fig. 5).
From the checkpoint (a forward pass over validation windows with the routers' gates recorded):
    experts per token by token id and frequency (ReMoE Fig. 7), the share of each domain's tokens
    each expert takes (ReMoE Fig. 9) and the mutual information between domain and expert, and
    the mutual information between the expert choices of consecutive layers (RMoE Fig. 3).

Shape legend: N tokens, L MoE layers, E experts, V vocabulary, C domains.
"""
import json
import os
from typing import NamedTuple

import numpy as np
import torch

import data

# an expert whose load is below 5% of its fair share is dead: relative to the fair share (the
# layer's mean load), so the same threshold serves top-k's K/E and ReMoE's varying density
DEAD = 0.05


class Log(NamedTuple):
    run: dict  # the run's config, parameters and tokens per iteration (train.py's first record)
    steps: list  # one record per logged training step, by iteration
    evals: list  # one record per evaluation, by iteration


def read_log(out_dir):
    """out_dir/log.jsonl as a Log. A resumed run may log some iterations twice: the later wins."""
    path = os.path.join(out_dir, 'log.jsonl')
    # keyed by iteration, so a record written again after a resume replaces the first one; the
    # three kinds of record are told apart by their keys (train.py writes no type field)
    run, steps, evals = {}, {}, {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if 'run' in r:
                run = r['run']
            elif 'val_loss' in r:
                evals[r['iter']] = r
            elif 'loss' in r:
                steps[r['iter']] = r
    return Log(run, [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)])


def final_eval(log):
    """The last evaluation record: {'iter', 'val_loss', 'train_loss', ['val_loss_per_domain']}."""
    return log.evals[-1] if log.evals else None


def final_score(log):
    """The run's score: its last evaluation record if that is train.py's final one ('final': True,
    every validation token once, 'val_tokens' of them), else None: a log that ends without one was
    made before train.py scored the whole split (a sample of windows), or has not finished."""
    last = final_eval(log)
    return last if last is not None and last.get('final') else None


def tokens_per_sec(log):
    """Median training speed, the first logged interval (compilation, warm-up) left out."""
    speeds = [r['tokens_per_sec'] for r in log.steps[1:]]
    return float(np.median(speeds)) if speeds else float('nan')


def recent_mean(log, key, last=100):
    """A per-layer statistic the log records every step (a list over MoE layers, or [L, E] lists),
    averaged over the last `last` iterations; None for a run that does not log it."""
    records = [r for r in log.steps if key in r]
    if not records:
        return None
    # by iteration, not by record count: with log_interval > 1 the last 100 iterations hold fewer records
    end = records[-1]['iter']
    return np.mean([r[key] for r in records if r['iter'] > end - last], axis=0)


def expert_load(log, last=100):
    """[L, E] fraction of tokens that used each expert, averaged over the last `last` iterations,
    or None for a run without routing statistics."""
    return recent_mean(log, 'load', last)


def dead_experts(load):
    """Per layer, the experts whose load is below DEAD x the fair share (the layer's mean load)."""
    fair = load.mean(axis=1, keepdims=True)
    return (load < DEAD * fair).sum(axis=1)


def load_cv(load):
    """Per layer, the coefficient of variation of the expert load (0 = perfectly balanced)."""
    return load.std(axis=1) / np.maximum(load.mean(axis=1), 1e-12)


def remoe_controller(log, band=0.02):
    """ReMoE's controller, from the sparsity and λ of every logged step (None if the run has none).

    target: 1 - K/E. settle_iter: the first iteration from which the sparsity stays within
    ±band of the target to the end of the run (None if it never does). spread: the standard
    deviation of the sparsity from settling on (or, if it never settles, after the first 200
    iterations). max_dev_after_200: the largest distance from target after iteration 200.
    min_lambda_after: the smallest λ after the sparsity first reached the band (stage II's end),
    and lambda_peak, λ's largest value before then."""
    records = [r for r in log.steps if 'lambda' in r]
    if not records:
        return None
    run = log.run
    target = 1 - run['top_k'] / run['n_expert']  # granularity scales both: same target
    it = np.array([r['iter'] for r in records])
    s = np.array([r['sparsity'] for r in records])
    lam = np.array([r['lambda'] for r in records])
    inside = np.abs(s - target) <= band
    outside = np.nonzero(~inside)[0]
    # settled from the record after the last one outside the band; if the last record is outside
    # the band, the run never settled (None)
    settle = 0 if len(outside) == 0 else (outside[-1] + 1 if outside[-1] + 1 < len(it) else None)
    first_in = np.nonzero(inside)[0]  # its first element is where stage II ends
    late = it > 200  # one fixed yardstick for every run (the paper's ReMoE settles in ~110 steps)
    return {
        'target': target,
        'settle_iter': None if settle is None else int(it[settle]),
        'spread': float(np.std(s[settle:] if settle is not None else s[late])) if late.any() else float('nan'),
        'max_dev_after_200': float(np.max(np.abs(s[late] - target))) if late.any() else float('nan'),
        'lambda_peak': float(lam[:first_in[0] + 1].max()) if len(first_in) else float(lam.max()),
        'min_lambda_after': float(lam[first_in[0]:].min()) if len(first_in) else float('nan'),
        'final_lambda': float(lam[-1]),
        'final_sparsity': float(s[-1]),
    }

# -----------------------------------------------------------------------------
# from the checkpoint: the routers' gates on validation tokens


@torch.no_grad()
def routing_snapshot(out_dir, n_windows=512, batch=64, data_dir=None, seed=0):
    """Run the checkpoint's model over n_windows random validation windows and record every MoE
    layer's gates. Returns a dict: tokens [N] (the input ids), domains [N] or None, gates
    [N, L, E] (float32, zero = inactive), domain_names, counts [V] (each id's count in the
    training split), top_k; or None for a dense model. data_dir overrides the checkpoint's."""
    from checkpoint import load_checkpoint, model_from_checkpoint  # lazily: the log-only numbers need no model
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    config, tokenizer = ckpt['config'], ckpt.get('tokenizer', 'gpt2')  # older checkpoints: GPT-2 BPE
    # the loop reference runs eagerly on any device, whichever backend the run trained with
    # (triton on a GPU): the gates, which are all this records, do not depend on the backend
    model = model_from_checkpoint(ckpt, expert_impl='loop').eval()
    routers = model.routers()
    if not routers:
        return None
    folder = data.dataset_folder(config['dataset'], data_dir or config['data_dir'], hf_name=config['hf_name'],
                                 hf_files=config['hf_files'], tokenizer=tokenizer)
    meta = data.load_meta(folder)
    val = data.load_split(folder, 'val')
    token_domain = data.token_domains(meta, 'val')
    # a hook on each router collects its gates (out[0] of the router contract) in layer order,
    # without changing the model's forward
    gates = []
    hooks = [r.register_forward_hook(lambda mod, inp, out: gates.append(out[0].float())) for r in routers]
    # a generator of its own, seeded apart from the run's seed: every run sees the same windows
    generator = torch.Generator().manual_seed(seed)
    T = model.config.block_size
    tokens, domains, per_layer = [], [], []
    for start in range(0, n_windows, batch):
        ix = data.window_offsets(len(val), min(batch, n_windows - start), T, generator)
        x, _ = data.windows(val, ix, T)
        gates.clear()
        model(x)  # no targets: the gates of every position are still computed, layer by layer
        per_layer.append(torch.stack(gates, dim=1))  # [B*T, L, E]
        tokens.append(x.flatten())
        if token_domain is not None:  # the domain of each input token x (not of its target y)
            domains.append(torch.from_numpy(token_domain[(np.array(ix)[:, None] + np.arange(T)).ravel()]))
    for h in hooks:
        h.remove()
    train = data.load_split(folder, 'train')  # token frequencies come from what the model trained on
    return {
        'tokens': torch.cat(tokens).numpy(),
        'domains': torch.cat(domains).numpy() if domains else None,
        'domain_names': meta.get('domains', []),
        'gates': torch.cat(per_layer).numpy(),
        'counts': np.bincount(train, minlength=meta['vocab_size']),
        'top_k': model.config.moe_shape()[1],  # the active experts per token, granularity included
        'tokenizer': tokenizer,
    }


def experts_per_token_by_id(snap, min_count=20):
    """For each token id seen at least min_count times in the snapshot: its training-set frequency
    and its mean number of active experts per MoE layer. Returns ids, frequency, experts."""
    active = (snap['gates'] > 0).sum(axis=2).mean(axis=1)  # [N] experts per layer for each token
    # per id: how often it occurs in the snapshot, and the sum of its experts, so total / seen is
    # the mean; ids seen fewer than min_count times would only add noise to the correlation
    seen = np.bincount(snap['tokens'], minlength=len(snap['counts']))
    total = np.bincount(snap['tokens'], weights=active, minlength=len(snap['counts']))
    ids = np.nonzero(seen >= min_count)[0]
    return ids, snap['counts'][ids] / snap['counts'].sum(), total[ids] / seen[ids]


def spearman(a, b):
    """Spearman's rank correlation (ties get their mean rank)."""
    # written out (numpy only) rather than taken from scipy, which the project does not need
    # otherwise: the Pearson correlation of the ranks
    def ranks(x):
        order = np.argsort(x, kind='stable')
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # mean rank within ties
            tie = x == v
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def _mutual_information(joint):
    """I(X; Y) in bits of a joint count table."""
    p = joint / joint.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)  # the marginals; px @ py: independence
    nz = p > 0  # 0 log 0 = 0: empty cells add nothing
    return float((p[nz] * np.log2(p[nz] / (px @ py)[nz])).sum())


def _domain_expert_counts(snap):
    """[L, C, E]: how many (token, expert) assignments of domain c's tokens went to expert e in
    layer l. A token with K active experts counts K times, once for each."""
    active = snap['gates'] > 0  # [N, L, E]
    C = len(snap['domain_names'])
    return np.stack([active[snap['domains'] == c].sum(axis=0) for c in range(C)], axis=1)


def domain_expert_share(snap):
    """[L, C, E]: of the (token, expert) assignments of domain c's tokens in layer l, the share that
    went to expert e (each row sums to 1; 1/E everywhere is no specialisation)."""
    counts = _domain_expert_counts(snap)
    return counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)  # a domain with no tokens: 0s


def domain_mutual_information(snap):
    """Per layer, I(domain; expert) in bits over (token, expert) assignments: 0 when every domain
    spreads over the experts alike, up to log2(C) when each domain has experts of its own."""
    counts = _domain_expert_counts(snap)
    return [_mutual_information(counts[layer]) for layer in range(counts.shape[0])]


def cross_layer_mutual_information(snap):
    """Mean over consecutive MoE layers of I(expert of layer l; expert of layer l+1) in bits, each
    token's expert being its largest gate; tokens without an active expert in either layer are
    left out. How much one layer's routing tells about the next one's (RMoE Fig. 3)."""
    g = snap['gates']
    # one expert per token and layer, so the joint table is E x E whatever K is; a ReMoE token
    # with no active expert has an argmax that means nothing, hence `on`
    top = g.argmax(axis=2)  # [N, L]
    on = (g > 0).any(axis=2)
    E = g.shape[2]
    mi = []
    for layer in range(g.shape[1] - 1):
        keep = on[:, layer] & on[:, layer + 1]
        joint = np.zeros((E, E))
        np.add.at(joint, (top[keep, layer], top[keep, layer + 1]), 1)
        mi.append(_mutual_information(joint))
    return float(np.mean(mi)) if mi else float('nan')


def expert_similarity(out_dir):
    """Per MoE layer, the mean cosine similarity of its experts' weights over every pair of experts
    (each expert's w_in and w_out flattened into one vector): how alike the experts grew (RMoE Fig. 5).
    None for a model without routed experts."""
    from checkpoint import load_checkpoint
    state = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))['model']
    layers = []
    for name, w_in in state.items():
        if not name.endswith('.experts.w_in'):  # routed experts only: shared experts are not compared
            continue
        w_out = state[name.removesuffix('w_in') + 'w_out']
        v = torch.cat([w_in.flatten(1), w_out.flatten(1)], dim=1).float()  # [E, D*2H + H*D]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = v @ v.T  # [E, E]
        E = cos.size(0)
        layers.append(float((cos.sum() - cos.diagonal().sum()) / (E * (E - 1))))  # off the diagonal
    return layers or None


def fmt_params(n):
    return f'{n / 1e6:.2f}M'


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    # ddof=1: the seeds are a sample of what the training could give, not the whole population
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_minutes(seconds):
    m, s = divmod(int(round(seconds)), 60)
    return f'{m}m{s:02d}s' if m < 60 else f'{m // 60}h{m % 60:02d}m'

