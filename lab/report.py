"""
A bake-off's results, from its finished runs: results/<name>/results.md (tables and the papers'
claims checked against the numbers) and the PNG figures beside it. bakeoff.py calls write() after
training; every number comes from the runs' log.jsonl and ckpt.pt files (lab.analysis), so a
report can be written again at any time from the run folders alone, without training.
"""
import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from lab import analysis


def kind(run):
    """What a run's config makes of its MoE layers: 'dense', 'topk', 'remoe', 'topk-recurrent',
    'topk-bias' (balance='bias'), 'topk-noaux' (balance='none'), 'remoe-shared', ..."""
    # the claims below look runs up by kind, not by label: a label is whatever the user typed
    if run['moe_every'] == 0:
        return 'dense'
    balance = {'aux': '', 'bias': '-bias', 'none': '-noaux'}[run.get('balance', 'aux')]  # older runs: aux
    return (run['router'] + ('-recurrent' if run['recurrent_router'] else '') + balance
            + ('-shared' if run.get('n_shared_expert', 0) else ''))


def summarize(folder, runs, seeds):
    """Per label, the numbers of each seed's run (lists over seeds) and its first seed's snapshot."""
    rows = {}
    for label, _, _ in runs:
        dirs = [folder / 'runs' / f'{label}-s{seed}' for seed in seeds]
        logs = [analysis.read_log(d) for d in dirs]
        finals = [analysis.final_eval(log) for log in logs]
        # each checkpoint over the same 256 validation windows (the snapshot's generator has a
        # fixed seed, not the run's), so every run's routing is measured on the same tokens
        snaps = [analysis.routing_snapshot(d, n_windows=256) for d in dirs]
        loads = [analysis.expert_load(log) for log in logs]
        # every list below has one entry per seed, so that a table can show mean ± std; 'snap',
        # the first seed's snapshot, is what the per-token figures draw
        row = {
            'dirs': dirs, 'run': logs[0].run, 'kind': kind(logs[0].run), 'snap': snaps[0],
            'val': [f['val_loss'] for f in finals],
            'domains': {d: [f['val_loss_per_domain'][d] for f in finals] for d in logs[0].run.get('domains', [])},
            'tokens_per_sec': [analysis.tokens_per_sec(log) for log in logs],
            'seconds': [json.loads((d / 'run.json').read_text())['seconds'] for d in dirs],
            'load': None if loads[0] is None else np.mean(loads, axis=0),
            'dead': None if loads[0] is None else [int(analysis.dead_experts(x).sum()) for x in loads],
            'load_cv': None if loads[0] is None else np.mean([analysis.load_cv(x) for x in loads], axis=0),  # [L]
            'mean_load_cv': None if loads[0] is None else [float(analysis.load_cv(x).mean()) for x in loads],
            # the imbalance of each step's batch (what capacity drops see), mean over layers and the last 100 steps
            'step_load_cv': [None if x is None else float(np.mean(x)) for x in
                             (analysis.recent_mean(log, 'load_cv') for log in logs)],
            'dropped': [analysis.recent_mean(log, 'dropped') for log in logs],  # per seed, [L] or None
            'bias_spread': [log.steps[-1].get('bias_spread') for log in logs],  # per seed, [L] or None
            # the last logged step's experts per token, by layer (ReMoE's varies during training)
            'experts': None if loads[0] is None else np.mean([log.steps[-1]['active_experts'] for log in logs], axis=0),
            'controller': [analysis.remoe_controller(log) for log in logs],
        }
        if snaps[0] is not None:  # None: a dense model, no router to look at
            row['cross_mi'] = [analysis.cross_layer_mutual_information(s) for s in snaps]
            if snaps[0]['domains'] is not None:
                row['domain_mi'] = [float(np.mean(analysis.domain_mutual_information(s))) for s in snaps]
            row['rho'] = [analysis.spearman(*analysis.experts_per_token_by_id(s)[1:]) for s in snaps]
        rows[label] = row
    return rows


def pm(values, digits=4):
    """'mean ± std' over seeds, or the value alone for one seed (a std of 0 would claim no noise)."""
    mean, std = analysis.mean_std(values)
    return f'{mean:.{digits}f} ± {std:.{digits}f}' if len(values) > 1 else f'{mean:.{digits}f}'


def tables(rows):
    """The markdown tables of results.md, as lines: every run's losses and speed; then, for the runs
    that route, how they use their experts; the balancing bias; ReMoE's controller."""
    first = next(iter(rows.values()))
    domains = list(first['domains'])
    lines = ['| run | active / total params | val loss | ' + ' | '.join(domains) + (' | ' if domains else '')
             + 'tokens/s | wall time |', '|---' * (5 + len(domains)) + '|']
    best = min(np.mean(r['val']) for r in rows.values())  # in bold: the lowest mean, ties included
    for label, r in rows.items():
        val = pm(r['val'])
        val = f'**{val}**' if np.mean(r['val']) == best else val
        lines.append(f"| {label} | {analysis.fmt_params(r['run']['active_params'])} / "
                     f"{analysis.fmt_params(r['run']['params'])} | {val} | "
                     + ''.join(f"{pm(r['domains'][d], 3)} | " for d in domains)
                     + f"{np.mean(r['tokens_per_sec']):,.0f} | {analysis.fmt_minutes(np.mean(r['seconds']))} |")
    routed = {k: r for k, r in rows.items() if r['load'] is not None}
    if routed:
        by_layer = lambda xs, fmt='.2f': ' / '.join(f'{x:{fmt}}' for x in xs)
        lines += ['', '| run | experts per token, by layer | load CV, by layer | per-step load CV | dead experts '
                  '(per seed) | dropped | I(domain; expert), bits | cross-layer MI, bits | ρ(frequency, experts) |',
                  '|---' * 9 + '|']
        for label, r in routed.items():
            # dropped is logged by every router; it means something only with a capacity limit
            dropped = [np.mean(d) for d in r['dropped'] if d is not None]
            dropped = f'{100 * np.mean(dropped):.1f}%' if dropped and r['run'].get('capacity_factor', 0) > 0 else '-'
            step_cv = pm(r['step_load_cv'], 3) if None not in r['step_load_cv'] else '-'
            lines.append(f"| {label} | {by_layer(r['experts'])} | {by_layer(r['load_cv'])} | {step_cv} | "
                         f"{', '.join(map(str, r['dead']))} | {dropped} | "
                         f"{pm(r['domain_mi'], 3) if 'domain_mi' in r else '-'} | {pm(r['cross_mi'], 3)} | "
                         # a router that gives every token K experts has no rank correlation (ρ NaN)
                         f"{'- (K fixed)' if np.isnan(r['rho']).all() else pm(r['rho'], 2)} |")
    biased = {k: r for k, r in rows.items() if r['bias_spread'][0] is not None}
    if biased:
        lines += ['', '| run | bias spread (max − min) at the end, by layer | bias step u |', '|---' * 3 + '|']
        for label, r in biased.items():
            lines.append(f"| {label} | {by_layer(np.mean(r['bias_spread'], axis=0), '.3f')} | "
                         f"{r['run']['bias_update_rate']:g} |")
    controlled = {k: r for k, r in rows.items() if r['controller'][0] is not None}
    if controlled:
        lines += ['', '| run | settles in ±0.02 at step | spread after | max \\|S − S*\\| after step 200 | '
                  'λ peak | min λ after stage II | final λ |', '|---' * 7 + '|']
        for label, r in controlled.items():
            # λ moves by orders of magnitude, so its seeds are averaged geometrically (the mean of
            # the logs), and the lowest λ after stage II is the lowest of any seed
            c = r['controller']
            settle = ', '.join('never' if x['settle_iter'] is None else str(x['settle_iter']) for x in c)
            lines.append(f"| {label} | {settle} | {np.mean([x['spread'] for x in c]):.4f} | "
                         f"{np.mean([x['max_dev_after_200'] for x in c]):.3f} | "
                         f"{np.exp(np.mean(np.log([x['lambda_peak'] for x in c]))):.1e} | "
                         f"{min(x['min_lambda_after'] for x in c):.1e} | "
                         f"{np.exp(np.mean(np.log([x['final_lambda'] for x in c]))):.1e} |")
    return lines


def _one(rows, name, n_expert=None):
    """The single label of a kind (at a given E), or None if there is none or several."""
    found = [k for k, r in rows.items() if r['kind'] == name and (n_expert is None or r['run']['n_expert'] == n_expert)]
    return found[0] if len(found) == 1 else None


def _noise(n_seeds, gap, noise, what='gap'):
    """How a gap between means compares with the seeds' noise (their largest std), in words."""
    return ('one seed: no noise estimate' if n_seeds < 2 else
            'within seed noise' if gap < 2 * noise else f'{what} above twice the seed std')


def claims(rows):
    """Each paper claim this bake-off can test, as a line saying whether it holds, with the numbers.
    A claim whose runs are not all in the bake-off (or whose kind is there twice) is left out."""
    out = []
    mean = {k: np.mean(r['val']) for k, r in rows.items()}
    std = {k: analysis.mean_std(r['val'])[1] for k, r in rows.items()}

    def order(claim, source, labels):
        # the claim is that the mean val losses of labels rise in this order; every gap must hold
        if None in labels:
            return
        vals = [mean[k] for k in labels]
        holds = all(a < b for a, b in zip(vals, vals[1:]))
        gaps = [b - a for a, b in zip(vals, vals[1:])]
        noise = max(std[k] for k in labels)
        note = _noise(len(rows[labels[0]]['val']), min(abs(g) for g in gaps), noise, 'gaps')
        out.append(f"- {claim} ({source}): **{'holds' if holds else 'does not hold'}**: "
                   + ' vs '.join(f'{k} {mean[k]:.4f}' for k in labels)
                   + f" (gaps {', '.join(f'{g:+.4f}' for g in gaps)}; largest seed std {noise:.4f}; {note})")

    order('ReMoE < top-k < dense in validation loss', 'ReMoE §4.2, Fig. 6',
          [_one(rows, 'remoe'), _one(rows, 'topk'), _one(rows, 'dense')])
    order('RMoE < top-k', 'RMoE Table 1', [_one(rows, 'topk-recurrent'), _one(rows, 'topk')])
    order('expert prototyping < top-k at equal compute', 'M6-T abstract', [_one(rows, 'prototype'), _one(rows, 'topk')])
    order('recurrent ReMoE < ReMoE (the GRU helps ReLU routing too; no paper tests it)', 'this repo',
          [_one(rows, 'remoe-recurrent'), _one(rows, 'remoe')])
    # ReMoE Fig. 6b: needs top-k and ReMoE at two or more expert counts, paired by E
    experts = sorted({r['run']['n_expert'] for r in rows.values()})
    pairs = [(e, _one(rows, 'topk', e), _one(rows, 'remoe', e)) for e in experts]
    pairs = [(e, t, r) for e, t, r in pairs if t and r]
    if len(pairs) >= 2:
        gaps = [mean[t] - mean[r] for _, t, r in pairs]
        holds = all(a < b for a, b in zip(gaps, gaps[1:]))
        out.append(f"- ReMoE's gain over top-k grows with E (ReMoE Fig. 6b): "
                   f"**{'holds' if holds else 'does not hold'}**: "
                   + ', '.join(f'E={e}: {g:+.4f}' for (e, _, _), g in zip(pairs, gaps)))
    order('loss-free bias balancing < the Switch aux loss in validation loss', 'arXiv 2408.15664',
          [_one(rows, 'topk-bias'), _one(rows, 'topk')])
    biased, aux = _one(rows, 'topk-bias'), _one(rows, 'topk')
    if biased and aux:  # the paper's MaxVio is the largest overload; the load CV is its spread
        for key, what in (('mean_load_cv', 'CV of the load averaged over the last 100 steps'),
                          ('step_load_cv', "CV of each step's load, averaged over the last 100 steps")):
            (a, sa), (b, sb) = (analysis.mean_std(rows[k][key]) for k in (biased, aux))
            note = _noise(len(rows[biased][key]), abs(a - b), max(sa, sb))
            out.append(f"- loss-free bias balancing balances the load better than the aux loss (arXiv 2408.15664): "
                       f"**{'holds' if a < b else 'does not hold'}**: {what}, mean over layers, "
                       f"{a:.3f} ± {sa:.3f} vs {b:.3f} ± {sb:.3f} ({note})")
    remoe = _one(rows, 'remoe')
    if remoe and 'rho' in rows[remoe]:
        rho = np.mean(rows[remoe]['rho'])
        out.append(f"- rare tokens get more experts under ReMoE (ReMoE Fig. 7): "
                   f"**{'holds' if rho < 0 else 'does not hold'}**: "
                   f"Spearman ρ between a token's training frequency and its experts per layer = {rho:+.2f}")
    topk = _one(rows, 'topk')
    def more(claim, key, hi, lo, what):
        # the claim is that hi's mutual information (key, in bits) is above lo's
        (a, sa), (b, sb) = analysis.mean_std(rows[hi][key]), analysis.mean_std(rows[lo][key])
        note = _noise(len(rows[hi][key]), abs(a - b), max(sa, sb))
        out.append(f"- {claim}: **{'holds' if a > b else 'does not hold'}**: {what} {a:.3f} ± {sa:.3f} vs "
                   f"{b:.3f} ± {sb:.3f} bits ({note})")

    if remoe and topk and 'domain_mi' in rows[remoe]:
        more("ReMoE's experts specialise by domain more than top-k's (ReMoE Fig. 9)", 'domain_mi', remoe, topk,
             'I(domain; expert), mean over layers (0 = no specialisation),')
    rmoe = _one(rows, 'topk-recurrent')
    if rmoe and topk:
        more("RMoE's routing carries more information from layer to layer (RMoE Fig. 3)", 'cross_mi', rmoe, topk,
             'mutual information between the expert choices of consecutive layers,')
    return out


def write(folder, runs, seeds, plots=True):
    """results.md (and, with plots, the figures) for the finished runs of a bake-off folder.
    runs: bakeoff.parse_runs' entries; seeds: the list of seeds."""
    folder = Path(folder)
    rows = summarize(folder, runs, seeds)
    settings = json.loads((folder / 'bakeoff.json').read_text())
    first = next(iter(rows.values()))['run']
    per_iter = {r['run']['tokens_per_iter'] for r in rows.values()}
    # the command that made it (an empty argv would leave a stray space inside the backquotes)
    lines = [f'# Bake-off: {folder}', '',
             f"`python bakeoff.py {' '.join(settings['argv'])}`".replace('`python bakeoff.py `', '`python bakeoff.py`'),
             '',
             f"{first['dataset']} ({first['tokenizer']}), {first['max_iters']:,} steps of "
             f"{first['tokens_per_iter']:,} tokens ({first['max_iters'] * first['tokens_per_iter'] / 1e6:.2f}M per run)"
             f", seeds {', '.join(map(str, seeds))}. {platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {datetime.date.today()}. Val loss: mean ± std over seeds"
             f" ({'nats per byte' if first['tokenizer'] == 'bytes' else 'nats per token'}); the best in bold.", '']
    if len(per_iter) > 1:  # an entry's own overrides may change the batch: equal steps, unequal tokens
        lines += [f'**Warning:** the runs differ in tokens per step ({sorted(per_iter)}).', '']
    lines += tables(rows) + ['', '## Paper claims at this scale', '']
    lines += claims(rows) or ['- none of the claims apply to these runs']
    if plots:  # imported here: matplotlib is needed only for the figures, never for the table
        from lab import plots as figures
        by_label = {label: r['dirs'] for label, r in rows.items()}  # every seed's run folder, per label
        made = [figures.val_loss(by_label, folder / 'val_loss.png'),
                figures.remoe_dynamics(by_label, folder / 'remoe_dynamics.png'),
                figures.load_balance(by_label, folder / 'load_balance.png'),
                figures.expert_load({k: r['load'] for k, r in rows.items()}, folder / 'expert_load.png'),
                figures.rare_tokens({k: r['snap'] for k, r in rows.items()}, folder / 'rare_tokens.png'),
                figures.domain_routing({k: r['snap'] for k, r in rows.items()}, folder / 'domain_routing.png')]
        lines += ['', '## Figures', ''] + [f'![{Path(p).stem}]({Path(p).name})' for p in made if p]
    (folder / 'results.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    print(f'\nwrote {folder}/results.md')
