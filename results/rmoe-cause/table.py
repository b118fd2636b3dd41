"""The root-cause table of README's "RMoE at small scale", from the study's run logs:

    python results/rmoe-cause/table.py <bake-off folder> <step> label...

One row per label (seed 1337): the val loss of the evaluation at <step> (the same validation windows
in every run: a seed's evaluations all draw from one generator seeded by the seed), its paired
difference to 'rmoe' and 'topk', and per MoE layer the routing statistics averaged over the 100
training steps before <step> (the same batches in every run), with the router logit std at step 0."""
import json
import sys
from pathlib import Path

STATS = ('router_logit_std', 'gate_sum', 'kept_prob', 'top1_top2', 'router_entropy', 'load_cv')


def read(folder, label, step):
    log = []
    for line in (Path(folder) / 'runs' / f'{label}-s1337' / 'log.jsonl').read_text().splitlines():
        try:
            log.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    steps = {r['iter']: r for r in log if 'loss' in r}
    evals = {r['iter']: r['val_loss'] for r in log if 'val_loss' in r}
    window = [steps[i] for i in range(step - 100, step) if i in steps]
    row = {'label': label, 'val': evals.get(step), 'last': max(steps) if steps else 0}
    for key in STATS:
        if len(window) == 100 and key in window[-1]:
            row[key] = [sum(r[key][i] for r in window) / 100 for i in range(len(window[-1][key]))]
        if 0 in steps and key in steps[0]:
            row[key + '@0'] = steps[0][key]
    return row


def fmt(v, d=2):
    return ' / '.join(f'{x:.{d}f}' for x in v) if v else '-'


if __name__ == '__main__':
    folder, step, labels = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rows = [read(folder, label, step) for label in labels]
    base = {r['label']: r['val'] for r in rows if r['val'] is not None}
    print(f'| run (val loss at step {step}) | val loss | − rmoe | − topk | logit std at step 0 | logit std | gate sum '
          f'| kept prob (OB) | top-1 / top-2 (IB) | entropy, nats | load CV |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        if r['val'] is None:
            print(f"| {r['label']} | (at step {r['last']}) |" + ' |' * 9)
            continue
        d = lambda ref: f"{r['val'] - base[ref]:+.4f}" if ref in base and ref != r['label'] else '-'
        print(f"| {r['label']} | {r['val']:.4f} | {d('rmoe')} | {d('topk')} | {fmt(r.get('router_logit_std@0'), 3)} "
              f"| {fmt(r.get('router_logit_std'))} | {fmt(r.get('gate_sum'))} | {fmt(r.get('kept_prob'))} "
              f"| {fmt(r.get('top1_top2'), 2)} | {fmt(r.get('router_entropy'))} | {fmt(r.get('load_cv'))} |")
