"""
Figures of what routers do, from train.py's out_dir folders (log.jsonl and ckpt.pt) alone.

    python -m lab.plots out-remoe out-topk --out=plots     # every figure that applies to these runs

lab.report calls the same functions for a bake-off, its runs grouped by label (seeds together).
Each function takes {label: [out_dir, ...]} (or the numbers lab.analysis computed), skips the runs that
lack what it needs (a router without sparsity has no λ to plot) and returns the PNG's path, or
None when nothing applied. matplotlib is imported here only, so a results table needs none of it.
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use('Agg')  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lab import analysis  # noqa: E402

# matplotlib's default colour cycle as a list: the i-th label a figure draws gets COLORS[i]
# matplotlib's ten, then six more: a study of up to 16 entries gives each its own colour
COLORS = plt.rcParams['axes.prop_cycle'].by_key()['color'] + ['black', 'goldenrod', 'navy', 'lime', 'teal', 'maroon']


def _save(fig, path):
    # bbox_inches='tight': the picture is cropped to what is drawn, suptitle and legends included
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return path


def val_loss(runs, path):
    """Validation loss against training tokens, one line per label: the mean over its seeds, with
    a band from the lowest to the highest seed. Right panel: the second half of training, zoomed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout='constrained')
    drawn = False
    for i, (label, dirs) in enumerate(runs.items()):
        logs = [analysis.read_log(d) for d in dirs]
        curves = [{r['iter']: r['val_loss'] for r in log.evals} for log in logs if log.evals]
        if not curves:
            continue
        # only the evaluations every seed has, so each point of the mean averages the same seeds
        # (a run that stopped early has fewer)
        iters = sorted(set.intersection(*(set(c) for c in curves)))
        tokens = np.array(iters) * logs[0].run['tokens_per_iter'] / 1e6
        losses = np.array([[c[it] for it in iters] for c in curves])  # [seeds, evals]
        mean = losses.mean(axis=0)
        for ax in axes:
            ax.plot(tokens, mean, color=COLORS[i % len(COLORS)], label=f'{label} (n={len(curves)})', lw=1.6)
            if len(curves) > 1:
                ax.fill_between(tokens, losses.min(axis=0), losses.max(axis=0), color=COLORS[i % len(COLORS)],
                                alpha=0.2, lw=0)
        half = tokens >= tokens[-1] / 2  # every label trains the same tokens: one x axis for all
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    unit = 'nats per byte' if logs[0].run.get('tokenizer') == 'bytes' else 'nats per token'
    axes[0].set_title('validation loss')
    axes[1].set_title('second half of training (zoomed)')
    # the zoom is fitted to the mean curves of the second half: the first steps' losses, several
    # times larger, would otherwise flatten the differences that the comparison is about
    lows = [line.get_ydata()[half].min() for line in axes[1].get_lines()]
    highs = [line.get_ydata()[half].max() for line in axes[1].get_lines()]
    axes[1].set_xlim(tokens[half][0], tokens[-1])
    axes[1].set_ylim(min(lows) - 0.01, max(highs) + 0.01)
    for ax in axes:
        ax.set_xlabel('training tokens (millions)')
        ax.set_ylabel(f'validation loss ({unit})')
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Validation loss vs training tokens on {logs[0].run['dataset']} (band: lowest to highest seed)")
    return _save(fig, path)


def remoe_dynamics(runs, path):
    """ReMoE's controller, one column per run that has a λ: the sparsity against its target (stages
    I, II and III shaded), λ on a log scale, and the experts each MoE layer gives a token."""
    # the first seed only: the stages fall at other steps in each seed, and a mean would blur them
    logs = {label: analysis.read_log(dirs[0]) for label, dirs in runs.items()}
    logs = {label: log for label, log in logs.items() if any('lambda' in r for r in log.steps)}
    if not logs:
        return None
    fig, axes = plt.subplots(3, len(logs), figsize=(5.5 * len(logs), 8.5), sharex='col', squeeze=False,
                             layout='constrained')
    for col, (label, log) in enumerate(logs.items()):
        steps = [r for r in log.steps if 'lambda' in r]
        it = np.array([r['iter'] for r in steps])
        s = np.array([r['sparsity'] for r in steps])
        c = analysis.remoe_controller(log)
        ax = axes[0, col]
        ax.plot(it, s, lw=0.8, color=COLORS[0], label='measured sparsity')
        ax.axhline(c['target'], color='k', ls='--', lw=1, label=f"target 1 - K/E = {c['target']:.3f}")
        ax.axhspan(c['target'] - 0.02, c['target'] + 0.02, color='k', alpha=0.08, label='target ± 0.02')
        # stage I runs to the densest point, stage II until the sparsity first reaches the band; the
        # densest point is looked for in the first third only, so that a late dip is not taken for it
        dense_end = it[np.argmin(s[:max(1, len(s) // 3)])]
        inside = np.nonzero(np.abs(s - c['target']) <= 0.02)[0]
        band_start = it[inside[0]] if len(inside) else it[-1]
        for (a, b), name, shade in (((0, dense_end), 'I', 0.10), ((dense_end, band_start), 'II', 0.18),
                                    ((band_start, it[-1]), 'III', 0.0)):
            ax.axvspan(a, b, color=COLORS[1], alpha=shade, lw=0)
            # x in data units, y in axes units: the stage names sit at the bottom whatever the scale
            ax.text((a + b) / 2, 0.02, name, ha='center', transform=ax.get_xaxis_transform(), fontsize=10)
        ax.set_ylabel('sparsity (fraction of zero gates)')
        ax.set_ylim(0, 1)
        ax.set_title(f'{label}: sparsity' + (f" (in band from step {c['settle_iter']})"
                                              if c['settle_iter'] is not None else ' (never settles)'))
        ax.legend(fontsize=8, loc='lower right')
        ax = axes[1, col]
        # a log scale: each step multiplies or divides λ by α
        ax.semilogy(it, [r['lambda'] for r in steps], color=COLORS[2], lw=1)
        ax.set_ylabel('λ (L1 coefficient)')
        ax.set_title(f"{label}: λ (min after stage II {c['min_lambda_after']:.1e})")
        ax = axes[2, col]
        active = np.array([r['active_experts'] for r in steps])  # [steps, L]
        for layer in range(active.shape[1]):
            ax.plot(it, active[:, layer], lw=0.9, label=f'layer {layer}')
        K = log.run['top_k'] * log.run.get('expert_granularity', 1)  # fine-grained: G x K active (ReMoE §4.3)
        ax.axhline(K, color='k', ls='--', lw=1, label=f"K = {K}")
        ax.set_ylabel('active experts per token')
        ax.set_xlabel('training step')
        ax.set_title(f'{label}: experts per token, by MoE layer')
        ax.legend(fontsize=8, ncol=2)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.suptitle("ReMoE's controller: sparsity, λ and experts per token by layer")
    return _save(fig, path)


def load_balance(runs, path, window=25):
    """Left: how balanced each routed label's experts are during training, the load CV (0 =
    balanced) averaged over MoE layers and seeds, smoothed over `window` logged steps. Right, for
    the runs with balance='bias': the bias spread (max - min) of each MoE layer, first seed."""
    logs = {label: [analysis.read_log(d) for d in dirs] for label, dirs in runs.items()}
    # a dense model logs no load: it has no experts to balance
    logs = {label: ls for label, ls in logs.items() if any('load_cv' in r for r in ls[0].steps)}
    if not logs:
        return None
    biased = {label: ls[0] for label, ls in logs.items() if any('bias_spread' in r for r in ls[0].steps)}
    fig, axes = plt.subplots(1, 2 if biased else 1, figsize=(11 if biased else 6.5, 4.2), squeeze=False,
                             layout='constrained')
    # a moving mean: one step's load CV is mostly the noise of its batch; 'valid' keeps only full
    # windows, so the curve starts at the window-th logged step
    smooth = lambda y: np.convolve(y, np.ones(window) / window, mode='valid')
    ax = axes[0, 0]
    for i, (label, ls) in enumerate(logs.items()):
        curves = [{r['iter']: np.mean(r['load_cv']) for r in log.steps if 'load_cv' in r} for log in ls]
        iters = sorted(set.intersection(*(set(c) for c in curves)))
        cv = np.mean([[c[it] for it in iters] for c in curves], axis=0)
        if len(cv) >= window:
            ax.plot(iters[window - 1:], smooth(cv), color=COLORS[i % len(COLORS)], lw=1.3,
                    label=f'{label} (n={len(ls)})')
    ax.set_xlabel('training step')
    ax.set_ylabel('load CV over experts (0 = balanced)')
    ax.set_title(f'Load imbalance, mean over MoE layers ({window}-step mean)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if biased:
        ax = axes[0, 1]
        for i, (label, log) in enumerate(biased.items()):
            steps = [r for r in log.steps if 'bias_spread' in r]
            spread = np.array([r['bias_spread'] for r in steps])  # [steps, L]
            # colour: the layer; line style: the label
            for layer in range(spread.shape[1]):
                ax.plot([r['iter'] for r in steps], spread[:, layer], lw=1, color=COLORS[layer % len(COLORS)],
                        ls=['-', '--', ':', '-.'][i % 4], label=f'{label}, layer {layer}')
        ax.set_xlabel('training step')
        ax.set_ylabel('bias max − min (probability units)')
        ax.set_title('Balancing bias spread, by MoE layer (first seed)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle('Load balancing during training: the aux loss, the bias, ReMoE\'s L1, none')
    return _save(fig, path)


def expert_load(loads, path):
    """Heat maps of expert load, layer x expert, one per label: the fraction of tokens using each
    expert over the last 100 steps, divided by the layer's fair share (1 = balanced). Dead experts
    (below 5% of the fair share) are crossed out. loads: {label: [L, E] array or None}."""
    loads = {label: load for label, load in loads.items() if load is not None}
    if not loads:
        return None
    fig, axes = plt.subplots(1, len(loads), figsize=(3.4 * len(loads) + 1, 3.4), squeeze=False,
                             layout='constrained')
    for ax, (label, load) in zip(axes[0], loads.items()):
        # load over the fair share, on a colour scale centred on 1 (white): blue under-used, red
        # over-used, the same scale for top-k's K/E and ReMoE's varying density
        rel = load / load.mean(axis=1, keepdims=True)
        im = ax.imshow(rel, cmap='RdBu_r', vmin=0, vmax=2, aspect='auto')
        for layer, e in zip(*np.nonzero(rel < analysis.DEAD)):
            ax.text(e, layer, 'x', ha='center', va='center', color='k', fontsize=12, fontweight='bold')
        ax.set_title(f'{label}\nload CV {analysis.load_cv(load).mean():.2f}, '
                     f'dead {int(analysis.dead_experts(load).sum())}', fontsize=9)
        ax.set_xlabel('expert')
        ax.set_ylabel('MoE layer')
        ax.set_xticks(range(load.shape[1]))
        ax.set_yticks(range(load.shape[0]))
    fig.colorbar(im, ax=axes[0].tolist(), label='load / fair share (1 = balanced)', shrink=0.9)
    fig.suptitle('Expert load over the last 100 training steps, first seed (x: dead, below 5% of the fair share)')
    return _save(fig, path)


def _byte_label(token_id, tokenizer):
    """A token as the plot names it: the byte's character (a name for the invisible ones), or, for
    GPT-2 BPE, the token id."""
    if tokenizer != 'bytes':
        return str(token_id)
    named = {10: '\\n', 32: 'space', 9: '\\t'}
    return named.get(token_id, chr(token_id) if 32 < token_id < 127 else f'0x{token_id:02x}')


def rare_tokens(snaps, path):
    """Experts per token against the token's training frequency (ReMoE Fig. 7): one point per token
    id, for every label whose router gives a variable number of experts; Spearman's ρ in the legend.
    snaps: {label: routing_snapshot(...) or None}."""
    # top-k gives every token K experts: a flat line says nothing, so only routers whose number of
    # active experts varies from token to token are drawn
    variable = {label: s for label, s in snaps.items()
                if s is not None and len(np.unique((s['gates'] > 0).sum(axis=2))) > 1}
    if not variable:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout='constrained')
    for i, (label, snap) in enumerate(variable.items()):
        ids, freq, experts = analysis.experts_per_token_by_id(snap)
        rho = analysis.spearman(freq, experts)
        ax.scatter(freq, experts, s=14, alpha=0.7, color=COLORS[i % len(COLORS)],
                   label=f'{label} (Spearman ρ = {rho:+.2f})')
        if i == 0:  # name the most and least frequent tokens of the first run
            order = np.argsort(freq)
            for j in list(order[:3]) + list(order[-3:]):
                ax.annotate(_byte_label(ids[j], snap['tokenizer']), (freq[j], experts[j]), fontsize=7,
                            xytext=(3, 3), textcoords='offset points')
    ks = {label: snap['top_k'] for label, snap in variable.items()}  # K x G: differs between granularities
    if len(set(ks.values())) == 1:
        ax.axhline(next(iter(ks.values())), color='k', ls='--', lw=1, label='K (top-k gives every token K)')
    else:
        for i, (label, k) in enumerate(ks.items()):
            ax.axhline(k, color=COLORS[i % len(COLORS)], ls='--', lw=1, label=f'K = {k} of {label} (top-k: every token)')
    ax.set_xscale('log')  # token frequencies span several orders of magnitude (Zipf)
    ax.set_xlabel('token frequency in the training data (fraction of tokens, log scale)')
    ax.set_ylabel('active experts per MoE layer (mean)')
    ax.set_title('Rare vs frequent tokens: how many experts each token gets (validation tokens)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def domain_routing(snaps, path):
    """Domain x expert heat maps (ReMoE Fig. 9), a row per label and a column per MoE layer: the
    share of each domain's (token, expert) assignments that went to each expert, relative to the
    uniform 1/E; the mutual information I(domain; expert) in each title."""
    snaps = {label: s for label, s in snaps.items() if s is not None and s['domains'] is not None}
    if not snaps:
        return None
    L = max(s['gates'].shape[1] for s in snaps.values())  # the deepest run's layers: a column each
    fig, axes = plt.subplots(len(snaps), L, figsize=(2.9 * L + 1.5, 1.9 * len(snaps) + 1.0), squeeze=False,
                             layout='constrained')
    for row, (label, snap) in enumerate(snaps.items()):
        share = analysis.domain_expert_share(snap)  # [L, C, E]
        mi = analysis.domain_mutual_information(snap)
        E = share.shape[2]
        for layer in range(L):
            ax = axes[row, layer]
            if layer >= len(share):  # a shallower run than the deepest
                ax.axis('off')
                continue
            # share x E: 1 (white) is the uniform share 1/E, as in expert_load's scale
            im = ax.imshow(share[layer] * E, cmap='RdBu_r', vmin=0, vmax=2, aspect='auto')
            ax.set_title(f'{label}, layer {layer}\nI(domain; expert) = {mi[layer]:.3f} bits', fontsize=8)
            ax.set_yticks(range(len(snap['domain_names'])))
            ax.set_yticklabels(snap['domain_names'] if layer == 0 else [], fontsize=8)
            ax.set_xticks(range(E))
            ax.tick_params(labelsize=7)
            if row == len(snaps) - 1:
                ax.set_xlabel('expert')
    fig.colorbar(im, ax=axes.ravel().tolist(), label='share of the domain / uniform share 1/E', shrink=0.8)
    fig.suptitle('Which experts each domain uses (validation tokens; 1 = uniform, red = the domain prefers it)')
    return _save(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m lab.plots', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out_dirs', nargs='+', help="train.py out_dir folders (each with log.jsonl, ckpt.pt)")
    p.add_argument('--out', default='plots', help='folder for the PNG files')
    p.add_argument('--data_dir', default=None, help="where the runs' datasets are (default: as trained)")
    args = p.parse_args(argv)
    # every folder is its own label (its name), with one seed: the figures then draw no bands
    runs = {}
    for d in args.out_dirs:
        if not os.path.isfile(os.path.join(d, 'log.jsonl')):
            print(f"error: {d}/log.jsonl is missing: pass out_dir folders that train.py wrote", file=sys.stderr)
            sys.exit(2)
        runs[os.path.basename(os.path.normpath(d))] = [d]
    made = [val_loss(runs, f'{args.out}/val_loss.png'), remoe_dynamics(runs, f'{args.out}/remoe_dynamics.png'),
            load_balance(runs, f'{args.out}/load_balance.png'),
            expert_load({k: analysis.expert_load(analysis.read_log(v[0])) for k, v in runs.items()},
                        f'{args.out}/expert_load.png')]
    # the routing figures need the weights; a run without a checkpoint gets the log's figures only
    with_ckpt = {k: v for k, v in runs.items() if os.path.isfile(os.path.join(v[0], 'ckpt.pt'))}
    snaps = {k: analysis.routing_snapshot(v[0], data_dir=args.data_dir) for k, v in with_ckpt.items()}
    made += [rare_tokens(snaps, f'{args.out}/rare_tokens.png'), domain_routing(snaps, f'{args.out}/domain_routing.png')]
    for path in made:
        if path:
            print(f'wrote {path}')


if __name__ == '__main__':
    main()
