import json, sys, glob, os
runs = {}
for d in sorted(glob.glob(os.path.join(sys.argv[1] if len(sys.argv) > 1 else 'results/rmoe-cause', 'runs', '*-s1337'))):
    lab = os.path.basename(d)[:-6]
    steps = {}
    vals = {}
    for line in open(f'{d}/log.jsonl'):
        try: r = json.loads(line)
        except Exception: continue
        if 'lm_loss' in r: steps[r['iter']] = r
        if 'val_loss' in r: vals[r['iter']] = r['val_loss']
    runs[lab] = (steps, vals)
n = min(max(s) for s, _ in runs.values() if s)
W = 100
print('train lm_loss mean over windows of 100 steps (same batches for every run)')
hdr = [(a, a + W) for a in range(0, 1500, W)]
for lab, (s, v) in runs.items():
    cells = []
    for a, b in hdr:
        xs = [s[i]['lm_loss'] for i in range(a, b) if i in s]
        cells.append(f'{sum(xs)/len(xs):.4f}' if len(xs) == W else '   -  ')
    print(f'{lab:12s}', ' '.join(cells), '| val', ' '.join(f'{k}:{x:.4f}' for k, x in sorted(v.items())))
