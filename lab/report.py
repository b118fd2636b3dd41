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
from lab.claims import claims
from lab.verdict import RULE
from model import ROUTERS


def kind(run):
    """What a run's config makes of its MoE layers: 'dense', or its router's kind (routers.py: each
    router class says which of its options differ from the defaults, in a fixed order), e.g. 'topk',
    'remoe', 'topk-recurrent', 'topk-recurrent-detach' (rmoe_flow), 'topk-sigmoid' (score),
    'topk-densegrad' (dense_grad), 'topk-bias' / 'topk-noaux' (balance), 'topk-seqaux',
    'remoe-shared', and '-norenorm' last for a softmax router whose kept gates are not renormalised."""
    # the claims below look runs up by kind, not by label: a label is whatever the user typed
    if run['moe_every'] == 0:
        return 'dense'
    return '-'.join(ROUTERS[run['router']].kind(run))


class ReportError(Exception):
    """A one-line message: why the report cannot be written and what to do."""


def rescore_argv(out_dir):
    """train.py's arguments that score a finished run's checkpoint on every validation token
    without training it or rewriting it: its log.jsonl gets a run record and a final val record.
    Eager (compile=False): only the short sampled evaluation before the score would use the graph."""
    return ['--init_from=resume', f'--out_dir={out_dir}', '--eval_only=True', '--compile=False']


def rescore_command(out_dir):
    return ' '.join(['python train.py', *rescore_argv(out_dir)])


def unscored(dirs):
    """The run folders whose log.jsonl does not end with train.py's final score over the whole
    validation split: made before train.py had one, their last val_loss is a sample of windows
    and must not be compared with a new run's."""
    return [d for d in dirs if analysis.final_score(analysis.read_log(d)) is None]


def summarize(folder, runs, seeds):
    """Per label, the numbers of each seed's run (lists over seeds) and its first seed's snapshot."""
    every = [folder / 'runs' / f'{label}-s{seed}' for label, _, _ in runs for seed in seeds]
    stale = unscored(every)
    if stale:
        raise ReportError(f"{len(stale)} run(s) end without a final score over every validation token "
                          f"({', '.join(d.name for d in stale)}): re-score each with `{rescore_command(stale[0])}` "
                          f"(no training), or run the bake-off again with --rescore")
    rows = {}
    for label, _, _ in runs:
        dirs = [folder / 'runs' / f'{label}-s{seed}' for seed in seeds]
        logs = [analysis.read_log(d) for d in dirs]
        finals = [analysis.final_score(log) for log in logs]  # every val token once: the run's score
        # each checkpoint over the same 256 validation windows (the snapshot's generator has a
        # fixed seed, not the run's), so every run's routing is measured on the same tokens
        snaps = [analysis.routing_snapshot(d, n_windows=256) for d in dirs]
        loads = [analysis.expert_load(log) for log in logs]
        # every list below has one entry per seed, so that a table can show mean ± std; 'snap',
        # the first seed's snapshot, is what the per-token figures draw
        row = {
            'dirs': dirs, 'run': logs[0].run, 'kind': kind(logs[0].run), 'snap': snaps[0],
            'val': [f['val_loss'] for f in finals],
            'val_tokens': [f['val_tokens'] for f in finals],
            'domains': {d: [f['val_loss_per_domain'][d] for f in finals] for d in logs[0].run.get('domains', [])},
            # the language-model loss of the last 100 training steps (no aux loss): seed s of every entry
            # trained on the same batches, so it pairs like the val loss (ReMoE compares Lory with Hash on it)
            'train': [analysis.recent_mean(log, 'lm_loss') for log in logs],
            'tokens_per_sec': [analysis.tokens_per_sec(log) for log in logs],
            'seconds': [json.loads((d / 'run.json').read_text())['seconds'] for d in dirs],
            # the first seed's [L, E]: an expert's index means nothing across seeds, so a mean over
            # seeds would smooth away the experts each seed let die
            'load': loads[0],
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
        # the same weights scored another way (router.score_variants: Expert Choice's teacher-forced rule)
        row['variants'] = {k.removeprefix('val_loss_'): [f[k] for f in finals] for k in finals[0]
                           if k.startswith('val_loss_') and k != 'val_loss_per_domain' and all(k in f for f in finals)}
        if snaps[0] is not None:  # None: a dense model, no router to look at
            row['cross_mi'] = [analysis.cross_layer_mutual_information(s) for s in snaps]
            if snaps[0]['domains'] is not None:
                row['domain_mi'] = [float(np.mean(analysis.domain_mutual_information(s))) for s in snaps]
            row['rho'] = [analysis.spearman(*analysis.experts_per_token_by_id(s)[1:]) for s in snaps]
        # RMoE §6's measures of the gates, as logged over the last 100 training steps, mean over layers:
        # entropy (Fig. 4), and for the softmax routers inner and outer balance (Table 8)
        for key, logged in (('entropy', 'router_entropy'), ('ib', 'top1_top2'), ('ob', 'kept_prob')):
            values = [analysis.recent_mean(log, logged) for log in logs]
            if all(v is not None for v in values):
                row[key] = [float(np.mean(v)) for v in values]
        similarity = [analysis.expert_similarity(d) for d in dirs]  # how alike the experts grew (Fig. 5)
        if all(s is not None for s in similarity):
            row['expert_cos'] = [float(np.mean(s)) for s in similarity]
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
    shaped = {k: r for k, r in rows.items() if 'ib' in r}
    if shaped:  # the softmax routers' gates (RMoE §6): the last 100 steps, mean over layers
        lines += ['', '| run | gate entropy, nats | top-1 / top-2 probability (IB) | kept probability (OB) | '
                  'expert weights, mean cosine |', '|---' * 5 + '|']
        for label, r in shaped.items():
            cos = pm(r['expert_cos'], 4) if 'expert_cos' in r else '-'
            lines.append(f"| {label} | {pm(r['entropy'], 3)} | {pm(r['ib'], 2)} | {pm(r['ob'], 3)} | {cos} |")
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
             f" ({'nats per byte' if first['tokenizer'] == 'bytes' else 'nats per token'}), each run scored on "
             f"every validation token once ({max(n for r in rows.values() for n in r['val_tokens']):,}); "
             f"the best in bold.", '']
    val_tokens = {n for r in rows.values() for n in r['val_tokens']}
    if len(val_tokens) > 1:  # a paired difference needs both runs scored on the same tokens
        lines += [f'**Warning:** the runs were scored on different numbers of validation tokens '
                  f'({sorted(val_tokens)}): their differences are not paired.', '']
    if len(per_iter) > 1:  # an entry's own overrides may change the batch: equal steps, unequal tokens
        lines += [f'**Warning:** the runs differ in tokens per step ({sorted(per_iter)}).', '']
    lines += tables(rows) + ['', '## Paper claims at this scale', '', RULE, '']
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
