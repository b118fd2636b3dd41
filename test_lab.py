"""
Tests for the router lab: lab/analysis.py's numbers on logs and snapshots whose answers are known,
lab/plots.py on a small synthetic log.jsonl, and bakeoff.py end to end in a subprocess.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lab import analysis
from lab import claims as lab_claims

REPO = Path(__file__).resolve().parent


def write_log(out_dir, router='remoe', iters=300, settle=120, n_layer=2, n_expert=4, top_k=1, dead=None,
              balance='aux', final=True):
    """A log.jsonl like train.py's: a run header, a record per step and an evaluation every 50.
    The sparsity falls, then climbs into the band around 1 - K/E at `settle` and stays there;
    λ grows x1.2 a step until then and then alternates around its peak. `dead`: (layer, expert)
    given no load at all. balance='bias' logs a bias spread that grows. final: the last evaluation
    is train.py's score over every validation token (False: a log made before train.py had one)."""
    os.makedirs(out_dir, exist_ok=True)
    target = 1 - top_k / n_expert
    run = dict(dataset='multidomain', tokenizer='bytes', max_iters=iters, top_k=top_k, n_expert=n_expert,
               moe_every=0 if router is None else 1, router=router or 'topk', recurrent_router=False,
               tokens_per_iter=1024, params=1000, active_params=800, domains=['drama', 'code'], balance=balance)
    records = [{'iter': 0, 'run': run}]
    rng = np.random.default_rng(0)
    lam = 1e-8
    for it in range(iters + 1):
        if it % 50 == 0:
            records.append({'iter': it, 'train_loss': 3 - it / 200, 'val_loss': 3.1 - it / 200,
                            'val_loss_per_domain': {'drama': 3.2 - it / 200, 'code': 3.0 - it / 200},
                            **({'final': True, 'val_tokens': 5000} if final and it == iters else {})})
        if it == iters:
            break
        record = {'iter': it, 'loss': 3 - it / 200, 'tokens_per_sec': 1000 + it}
        if router is not None:
            load = np.full((n_layer, n_expert), top_k / n_expert)
            if dead:
                load[dead] = 0.0
            cv = load.std(axis=1) / load.mean(axis=1) + 0.5 * np.exp(-it / 50)  # an imbalance that decays
            record.update(load=load.tolist(), load_cv=cv.tolist(), active_experts=[float(top_k)] * n_layer)
            if balance == 'bias':
                record.update(bias_spread=[0.001 * it] * n_layer)
        if router == 'remoe':
            s = 0.5 - 0.3 * it / 20 if it < 20 else 0.2 + (it - 20) * (target - 0.05 - 0.2) / (settle - 20)
            if it >= settle:
                s = target + rng.uniform(-0.015, 0.015)
            lam = lam * 1.2 if it < settle else lam * (1.2 if it % 2 else 1 / 1.2)
            record.update(sparsity=s, **{'lambda': lam})
        records.append(record)
    with open(os.path.join(out_dir, 'log.jsonl'), 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in records))
    return out_dir


def test_read_log_keeps_the_later_of_repeated_iterations(tmp_path):
    write_log(tmp_path)
    with open(tmp_path / 'log.jsonl', 'a') as f:  # a resumed run logs iteration 299 again
        f.write(json.dumps({'iter': 299, 'loss': 0.5, 'tokens_per_sec': 7}) + '\n')
    log = analysis.read_log(tmp_path)
    assert log.run['router'] == 'remoe' and [r['iter'] for r in log.steps] == list(range(300))
    assert log.steps[-1]['loss'] == 0.5 and [r['iter'] for r in log.evals] == [0, 50, 100, 150, 200, 250, 300]
    assert analysis.final_eval(log)['val_loss'] == pytest.approx(1.6)
    assert analysis.final_score(log)['val_tokens'] == 5000
    # a log that ends with a sampled val loss (made before train.py scored the whole split) has no score
    old = analysis.read_log(write_log(tmp_path / 'old', final=False))
    assert analysis.final_eval(old)['val_loss'] == pytest.approx(1.6) and analysis.final_score(old) is None


def test_remoe_controller_numbers(tmp_path):
    c = analysis.remoe_controller(analysis.read_log(write_log(tmp_path, settle=120)))
    assert c['target'] == 0.75 and c['settle_iter'] == 120
    assert 0.005 < c['spread'] < 0.0151 and c['max_dev_after_200'] <= 0.015
    assert c['lambda_peak'] == pytest.approx(1e-8 * 1.2 ** 120, rel=1e-6)
    assert c['min_lambda_after'] == pytest.approx(1e-8 * 1.2 ** 119, rel=1e-6)  # λ alternates x1.2 / ÷1.2
    assert analysis.remoe_controller(analysis.read_log(write_log(tmp_path / 'topk', router='topk'))) is None


def test_load_dead_experts_and_cv(tmp_path):
    log = analysis.read_log(write_log(tmp_path, router='topk', dead=(1, 2)))
    load = analysis.expert_load(log)
    assert load.shape == (2, 4) and load[1, 2] == 0
    assert list(analysis.dead_experts(load)) == [0, 1]
    assert analysis.load_cv(load)[0] == 0 and analysis.load_cv(load)[1] > 0.5
    assert analysis.expert_load(analysis.read_log(write_log(tmp_path / 'dense', router=None))) is None


def snapshot(gates, domains, tokens=None, counts=None):
    N = gates.shape[0]
    return {'gates': gates.astype(np.float32), 'domains': domains, 'domain_names': ['a', 'b'], 'top_k': 1,
            'tokens': np.zeros(N, int) if tokens is None else tokens, 'tokenizer': 'bytes',
            'counts': np.ones(256, int) if counts is None else counts}


def test_mutual_information_extremes():
    N, E = 320, 4  # 160 tokens a domain: every expert (pair) exactly equally often below
    domains = np.repeat([0, 1], N // 2)
    own = np.zeros((N, 2, E))  # domain 0 always expert 0, domain 1 always expert 1, in both layers
    own[np.arange(N), :, domains] = 1.0
    snap = snapshot(own, domains)
    assert analysis.domain_mutual_information(snap) == pytest.approx([1.0, 1.0])  # log2(2 domains)
    share = analysis.domain_expert_share(snap)
    assert share.shape == (2, 2, E) and share[0, 0, 0] == 1 and share[0, 1, 1] == 1
    assert analysis.cross_layer_mutual_information(snap) == pytest.approx(1.0)  # layer 1 repeats layer 0
    alike = np.zeros((N, 2, E))  # both domains spread evenly, and layer 1 independent of layer 0
    alike[np.arange(N), 0, np.arange(N) % E] = 1.0
    alike[np.arange(N), 1, (np.arange(N) // E) % E] = 1.0
    snap = snapshot(alike, domains)
    assert analysis.domain_mutual_information(snap) == pytest.approx([0.0, 0.0], abs=1e-12)
    assert analysis.cross_layer_mutual_information(snap) == pytest.approx(0.0, abs=1e-12)


def test_experts_per_token_by_id_and_spearman():
    tokens = np.repeat([5, 6, 7], 30)
    gates = np.zeros((90, 2, 4))
    for i, t in enumerate(tokens):  # token 5 gets 3 experts per layer, 6 gets 2, 7 gets 1
        gates[i, :, :8 - t] = 1.0
    counts = np.zeros(256, int)
    counts[[5, 6, 7]] = [10, 100, 1000]  # the rarest token gets the most experts
    ids, freq, experts = analysis.experts_per_token_by_id(snapshot(gates, None, tokens, counts))
    assert list(ids) == [5, 6, 7] and list(experts) == [3, 2, 1]
    assert freq == pytest.approx([10 / 1110, 100 / 1110, 1000 / 1110])
    assert analysis.spearman(freq, experts) == pytest.approx(-1.0)
    assert analysis.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties


def _png(path):
    assert path is not None and os.path.getsize(path) > 10_000
    assert Path(path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_plots_from_synthetic_logs(tmp_path):
    plots = pytest.importorskip('lab.plots')
    runs = {'remoe': [write_log(tmp_path / 'r1'), write_log(tmp_path / 'r2', settle=150)],
            'topk': [write_log(tmp_path / 't1', router='topk', dead=(0, 3))],
            'dense': [write_log(tmp_path / 'd1', router=None)]}
    _png(plots.val_loss(runs, tmp_path / 'fig' / 'val_loss.png'))
    _png(plots.remoe_dynamics(runs, tmp_path / 'fig' / 'remoe.png'))
    loads = {k: analysis.expert_load(analysis.read_log(v[0])) for k, v in runs.items()}
    _png(plots.expert_load(loads, tmp_path / 'fig' / 'load.png'))
    # a router without sparsity, or a dense model, is skipped, not an error
    no_remoe = {k: v for k, v in runs.items() if k != 'remoe'}
    assert plots.remoe_dynamics(no_remoe, tmp_path / 'fig' / 'none.png') is None
    assert plots.expert_load({'dense': None}, tmp_path / 'fig' / 'none.png') is None
    _png(plots.load_balance(runs, tmp_path / 'fig' / 'balance.png'))  # the aux loss and ReMoE: one panel
    runs['topk-bias'] = [write_log(tmp_path / 'b1', router='topk', balance='bias')]
    _png(plots.load_balance(runs, tmp_path / 'fig' / 'balance_bias.png'))  # + the bias spread
    assert plots.load_balance({'dense': runs['dense']}, tmp_path / 'fig' / 'none.png') is None
    assert not (tmp_path / 'fig' / 'none.png').exists()


def test_plots_from_synthetic_snapshots(tmp_path):
    plots = pytest.importorskip('lab.plots')
    rng = np.random.default_rng(0)
    N, L, E = 2000, 2, 4
    tokens = rng.integers(0, 40, N)
    domains = (tokens >= 20).astype(int)
    relu = np.maximum(rng.normal(size=(N, L, E)) - 0.3 + (tokens[:, None, None] < 10), 0)  # variable count
    topk = np.zeros((N, L, E))
    topk[np.arange(N), :, rng.integers(0, E, N)] = 0.7  # exactly one expert: nothing to show vs frequency
    counts = np.bincount(tokens, minlength=256) * 100
    snaps = {'remoe': snapshot(relu, domains, tokens, counts), 'topk': snapshot(topk, domains, tokens, counts),
             'dense': None}
    _png(plots.rare_tokens(snaps, tmp_path / 'rare.png'))
    fine = {**snaps['remoe'], 'top_k': 4}  # K x G of a fine-grained run: each run gets its own K line
    _png(plots.rare_tokens({'remoe': snaps['remoe'], 'remoe-g4': fine}, tmp_path / 'rare_g4.png'))
    assert plots.rare_tokens({'topk': snaps['topk'], 'dense': None}, tmp_path / 'none.png') is None
    _png(plots.domain_routing(snaps, tmp_path / 'domains.png'))
    # a deeper run after a shallower one (the depth study) still gets a column for each of its layers
    deep = snapshot(np.concatenate([relu, relu], axis=1), domains, tokens, counts)
    width = lambda path: pytest.importorskip('matplotlib.pyplot').imread(path).shape[1]
    both = width(plots.domain_routing({'remoe': snaps['remoe'], 'remoe-l4': deep}, tmp_path / 'mixed.png'))
    assert both == width(plots.domain_routing({'remoe-l4': deep}, tmp_path / 'deep.png'))
    assert both > width(plots.domain_routing({'remoe': snaps['remoe']}, tmp_path / 'shallow.png'))
    no_domains = {'remoe': {**snaps['remoe'], 'domains': None}}
    assert plots.domain_routing(no_domains, tmp_path / 'none.png') is None


TINY = ['--set=n_layer=2', '--set=n_embd=32', '--set=n_head=2', '--set=ffn_hidden=32', '--set=batch_size=4',
        '--set=block_size=32', '--set=eval_iters=2', '--set=compile=False']


def lab(tmp_path, *args, ok=True, env=None):
    proc = subprocess.run([sys.executable, str(REPO / 'bakeoff.py'), f'--results={tmp_path}/results',
                           f'--data_dir={tmp_path}/data', *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_line_error(proc, needle):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert needle in lines[0], lines[0]


def test_bakeoff_end_to_end(tmp_path):
    """Two routers, one seed, a few steps on a tiny model: table, plots, reuse and refusals."""
    args = ['--runs=topk,remoe', '--seeds=1', '--max_iters=12', '--dataset=shakespeare_char', '--name=t', '--jobs=1', *TINY]
    proc = lab(tmp_path, *args)
    folder = tmp_path / 'results' / 't'
    assert '[1/2] topk-s1337: training' in proc.stdout and '[2/2] remoe-s1337: training, bake-off ETA' in proc.stdout
    table = (folder / 'results.md').read_text()
    for needle in ('| topk |', '| remoe |', 'shakespeare_char (bytes), 12 steps', 'settles in ±0.02',
                   '## Paper claims at this scale', 'rare tokens get more experts under ReMoE'):
        assert needle in table, needle
    for name in ('val_loss', 'remoe_dynamics', 'expert_load', 'rare_tokens'):
        _png(folder / f'{name}.png')
    assert not (folder / 'domain_routing.png').exists()  # shakespeare_char has no domains
    run = folder / 'runs' / 'remoe-s1337'
    stamp = (run / 'ckpt.pt').stat().st_mtime_ns

    again = lab(tmp_path, *args, '--no_plots')  # finished runs are reused, never retrained
    assert '[2/2] remoe-s1337: done before' in again.stdout and (run / 'ckpt.pt').stat().st_mtime_ns == stamp
    # ... also when made in another clone of the repo: the config is recorded relative to the repo, and
    # a run recorded before that (an absolute path into the other clone's configs/) still matches
    state = json.loads((run / 'run.json').read_text())
    assert state['argv'][0] == 'configs/remoe.py', state['argv']
    clone = tmp_path / 'clone'
    (clone / 'configs').mkdir(parents=True)
    (clone / 'train.py').write_text('')
    (run / 'run.json').write_text(json.dumps({**state, 'argv': [str(clone / 'configs' / 'remoe.py'), *state['argv'][1:]]}))
    assert '[2/2] remoe-s1337: done before' in lab(tmp_path, *args, '--no_plots').stdout
    assert 'every validation token once' in table and 'one seed: not decided' in table

    # a run made before the full-split score: its log ends with a sampled val loss. It stops the
    # bake-off with the command that re-scores it; --rescore runs that command, which does not train
    records = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    for r in records:
        r.pop('final', None), r.pop('val_tokens', None)
    (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    old = lab(tmp_path, *args, '--no_plots', ok=False)
    one_line_error(old, '1 finished run(s) of')
    assert (f'remoe-s1337: no final score over every validation token; re-score: python train.py '
            f'--init_from=resume --out_dir={run} --eval_only=True') in old.stdout
    assert 'topk-s1337' not in old.stdout and (run / 'ckpt.pt').stat().st_mtime_ns == stamp
    mended = lab(tmp_path, *args, '--no_plots', '--rescore')
    assert '[re-score 1/1] remoe-s1337: val loss' in mended.stdout and ': training' not in mended.stdout
    assert (run / 'ckpt.pt').stat().st_mtime_ns == stamp
    assert analysis.final_score(analysis.read_log(run))['iter'] == 12
    assert '--rescore' not in (folder / 'results.md').read_text()  # not part of the command that made it

    one_line_error(lab(tmp_path, *[a.replace('12', '13') for a in args], ok=False), 'holds a bake-off made with '
                   'other settings (--max_iters=12 --max_iters=13): pass --name=<a new name> or delete')
    one_line_error(lab(tmp_path, *args[1:], '--runs=topk,nope', ok=False), "no config 'nope'; the configs are: cosine, deepseek, dense")
    one_line_error(lab(tmp_path, *args[1:], '--runs=topk,topk', ok=False), 'two runs have the same label')
    one_line_error(lab(tmp_path, *args, '--dataset=textfiles', ok=False), "dataset 'textfiles' cannot be prepared")
    one_line_error(lab(tmp_path, *args[1:], '--runs=topk+top_k=99', '--name=bad', ok=False),
                   "run 'topk+top_k=99' does not start: top_k=99")
    # matplotlib missing: an error before any training when plots are wanted; fine with --no_plots
    blocker = tmp_path / 'nompl'
    blocker.mkdir()
    (blocker / 'matplotlib.py').write_text("raise ImportError('no matplotlib here')\n")
    env = {'PYTHONPATH': str(blocker)}
    one_line_error(lab(tmp_path, *args, env=env, ok=False), 'pip install matplotlib, or pass --no_plots')
    assert 'done before' in lab(tmp_path, *args, '--no_plots', env=env).stdout

    # --jobs=2: both runs at once, one thread each; the same runs, scored alike (up to the rounding of
    # another thread count), and a failing run still stops the bake-off with its one line
    two = lab(tmp_path, *[a.replace('--name=t', '--name=t2') for a in args], '--no_plots', '--jobs=2')
    assert two.stdout.count(': training') == 2 and '[2/2] remoe-s1337: val loss' in two.stdout
    for label in ('topk', 'remoe'):
        got, want = (analysis.final_score(analysis.read_log(tmp_path / 'results' / name / 'runs' / f'{label}-s1337'))
                     for name in ('t2', 't'))
        assert abs(got['val_loss'] - want['val_loss']) < 1e-3 and got['val_tokens'] == want['val_tokens']
    failing = lab(tmp_path, *args[1:], '--runs=topk,bad:remoe+learning_rate=1e6+grad_clip=0+max_iters=40',
                  '--name=t3', '--no_plots', '--jobs=2', ok=False)  # the dry run passes (no step), training diverges
    one_line_error(failing, 'bad-s1337 stopped (exit code 4): error: training diverged')
    assert '[1/2] topk-s1337: val loss' in failing.stdout  # the run beside it finished


def test_bakeoff_prints_commands_for_a_scheduler_and_collects_their_runs(tmp_path):
    """--print: one train.py command a run, no training; once a scheduler (here: bash) has run them,
    the bake-off takes them as done and writes its report."""
    args = ['--runs=topk,dense', '--seeds=1', '--max_iters=6', '--dataset=shakespeare_char', '--name=p', '--no_plots',
            *TINY]
    printed = lab(tmp_path, *args, '--print')
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 2 and all(' train.py configs/' in line and '--seed=1337' in line for line in lines), lines
    run = tmp_path / 'results' / 'p' / 'runs' / 'topk-s1337'
    assert not (run / 'log.jsonl').exists()  # nothing trained
    proc = subprocess.run(['bash', '-c', lines[0]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (run / 'ckpt.pt').exists(), proc.stderr
    again = lab(tmp_path, *args, '--print')  # what is left: the other run only
    assert again.stdout.strip().splitlines() == lines[1:] and 'topk-s1337: done' in again.stderr
    subprocess.run(['bash', '-c', lines[1]], check=True, timeout=600)
    collected = lab(tmp_path, *args)
    assert collected.stdout.count('done before') == 2 and ': training' not in collected.stdout
    assert json.loads((run / 'run.json').read_text())['seconds'] > 0  # the logged steps' time
    assert '| topk |' in (tmp_path / 'results' / 'p' / 'results.md').read_text()


def test_report_kinds_name_router_balance_and_shared_experts():
    report = pytest.importorskip('lab.report')
    base = dict(moe_every=1, router='topk', recurrent_router=False, router_renorm=True)
    assert report.kind({**base, 'moe_every': 0}) == 'dense'
    assert report.kind(base) == 'topk'  # configs/topk.py
    assert report.kind({**base, 'router_renorm': False}) == 'topk-norenorm'
    old = dict(moe_every=1, router='topk', recurrent_router=False)  # logged before balance and renorm existed
    assert report.kind(old) == 'topk-norenorm'
    assert report.kind({**base, 'balance': 'bias'}) == 'topk-bias'
    assert report.kind({**base, 'balance': 'none', 'recurrent_router': True}) == 'topk-recurrent-noaux'
    assert report.kind({**base, 'router': 'remoe', 'balance': 'aux', 'n_shared_expert': 1}) == 'remoe-shared'
    assert report.kind({**base, 'router': 'remoe', 'router_renorm': False}) == 'remoe'  # ReLU gates: no renorm
    # the runs of the modern-router and Table 5 studies are told apart
    deepseek = {**base, 'score': 'sigmoid', 'balance': 'bias', 'seq_aux_coef': 1e-4}
    assert report.kind(deepseek) == 'topk-sigmoid-bias-seqaux'
    assert report.kind({**base, 'dense_grad': True, 'dense_grad_forward': False}) == 'topk-densegrad'
    assert report.kind({**base, 'dense_grad': True, 'dense_grad_forward': True}) == 'topk-densegrad-fwd'
    assert report.kind({**base, 'dense_grad': True}) == 'topk-densegrad-fwd'  # logged before the switch existed
    flows = [report.kind({**base, 'recurrent_router': True, 'rmoe_flow': f}) for f in ('pass', 'detach', 'none')]
    assert flows == ['topk-recurrent', 'topk-recurrent-detach', 'topk-recurrent-np']


def test_report_claims_find_the_studies_entries():
    def row(kind, gap):  # every seed `gap` above the same per-seed base
        return {'kind': kind, 'run': {'n_expert': 8}, 'val': list(np.array([1.50, 1.55, 1.60]) + gap), 'domains': {},
                'cross_mi': [0.5, 0.6, 0.7]}
    def heads(rows):
        return [line.split(':')[0] + ': ' + line.split('**')[1] if '**' in line else line for line in lab_claims.claims(rows)]
    table5 = {'topk': row('topk', [0, 0, 0]), 'rmoe': row('topk-recurrent', [-0.004, -0.005, -0.003]),
              'rmoe-np': row('topk-recurrent-np', [0.001, -0.001, 0.002]),
              'rmoe-detach': row('topk-recurrent-detach', [0.010, 0.012, 0.011])}
    assert heads(table5)[:4] == ['- RMoE < top-k (RMoE Table 1): holds',
                             '- RMoE < its state not passed (NP) (RMoE Table 5): holds',
                             '- RMoE < its state passed but detached (RMoE Table 5): holds',
                             '- top-k < RMoE with the state detached (RMoE Table 5): holds']
    modern = {'topk': row('topk', [0, 0, 0]), 'deepseek': row('topk-sigmoid-bias-seqaux', [-0.002, 0.001, 0.0]),
              'topk-dense': row('topk-densegrad', [-0.003, -0.004, -0.002]),
              'remoe': row('remoe', [0.010, 0.012, 0.011])}
    assert heads(modern)[:6] == ['- ReMoE < top-k < dense in validation loss (ReMoE §4.2, Fig. 6), link by link:',
                                 '  - remoe < topk: reversed',  # no dense in the study: the link that is there
                                 "- DeepSeek-V3's router < top-k (DeepSeek-V3 §2.1.2): not decided at this scale",
                                 "- ReMoE < DeepSeek-V3's router (ReMoE's thesis against today's default): reversed",
                                 '- top-k with a dense router gradient < top-k (Default MoE §4): holds',
                                 "- ReMoE < top-k with a dense router gradient (ReMoE's thesis, more than the gradient): reversed"]
    # an older bake-off's unrenormalised top-k still stands in as the baseline; with both, renorm is a claim
    old = {'topk': row('topk-norenorm', [0, 0, 0]), 'remoe': row('remoe', [-0.01, -0.012, -0.011])}
    assert heads(old)[0].startswith('- ReMoE < top-k < dense')
    both = {'topk': row('topk', [-0.03, -0.04, -0.035]), 'topk-old': row('topk-norenorm', [0, 0, 0])}
    assert heads(both) == ['- renormalised top-k gates < unrenormalised (RMoE and CompeteSMoE code; this repo): holds']
    # Default MoE both ways: each against top-k, and the two against each other
    ways = {'topk': row('topk-norenorm', [0, 0, 0]), 'bwd': row('topk-densegrad-norenorm', [-0.002, 0.001, 0.0]),
            'fwd': row('topk-densegrad-fwd-norenorm', [0.10, 0.09, 0.11])}
    assert heads(ways) == ['- top-k with a dense router gradient < top-k (Default MoE §4): not decided at this scale',
                           '- top-k with a dense router gradient (its defaults in the output too) < top-k '
                           '(Default MoE §4): reversed',
                           "- Default MoE's defaults in the router's gradient only < in the output too (this repo): holds"]



def test_report_claims_of_the_seeds_tables():
    """ReMoE Table 2 (k = 1, with ReMoE and dMoE at k = 2 too) and RMoE Table 1, looked up by kind."""
    def row(kind, gap, k=1):
        return {'kind': kind, 'run': {'n_expert': 8, 'top_k': k}, 'val': list(np.array([1.50, 1.55, 1.60]) + gap),
                'domains': {}, 'cross_mi': list(np.array([0.5, 0.6, 0.7]) + gap)}
    def heads(rows):
        return [line.split(':')[0] + ': ' + line.split('**')[1] if '**' in line else line for line in lab_claims.claims(rows)]
    table2 = {'dense': row('dense', 0.05), 'hash': row('hash', 0.04), 'lory': row('lory', [0.05, 0.03, 0.045]),
              'sparsemixer': row('sparsemixer', 0.02), 'expert_choice': row('expert_choice', 0.03),
              'topk': row('topk-norenorm', 0.01), 'remoe': row('remoe', 0.0),
              'topk-k2': row('topk-norenorm', -0.02, k=2), 'remoe-k2': row('remoe', -0.04, k=2)}
    table2['expert_choice']['variants'] = {'teacher_forced': list(np.array(table2['expert_choice']['val']) - 0.05)}
    lines = heads(table2)
    assert lines[-1] == '- Expert Choice scored with its training rule (teacher-forced, each expert picking from the ' \
                        'whole sequence, later tokens included) < scored causally (token choice over the same ' \
                        'scores, the score in the tables) (ReMoE Table 2 ran EC; this repo): holds'
    assert '- ReMoE < every other router at k = 1 (ReMoE Table 2), pair by pair:' in lines
    at = lines.index('- every learned router < Hash (ReMoE Table 2), pair by pair:')
    assert lines[at + 1:at + 6] == ['  - remoe < hash: holds', '  - lory < hash: not decided at this scale',
                                    '  - sparsemixer < hash: holds', '  - expert_choice < hash: holds',
                                    '  - topk < hash: holds']
    assert '  - topk < expert_choice: holds' in lines  # dMoE ahead of the others
    # the k trend pairs each k's entries (two top-k kinds alike: told apart by top_k)
    at = lines.index('- ReMoE < dMoE (top-k, unrenormalised) at each k, and whether the gain grows with k (no paper '
                     'claims a direction) (ReMoE Table 2 at k = 1), k by k:')
    assert lines[at + 1] == '  - at k=1: holds'
    assert lines[at + 3] == '  - gain at k=1 < gain at k=2: holds'  # 0.01 at k = 1, 0.02 at k = 2
    table1 = {'topk': row('topk', 0.0, 2), 'rmoe': row('topk-recurrent', -0.01, 2), 'mlp': row('mlp', 0.002, 2),
              'random': row('random', 0.03, 2), 'cosine': row('cosine', 0.01, 2), 'xmoe': row('xmoe', 0.01, 2),
              'hyperrouter': row('hyperrouter', 0.005, 2), 'xmoe-gru': row('xmoe-recurrent', 0.0, 2)}
    lines = heads(table1)
    at = lines.index('- RMoE < every other router of Table 1 (RMoE Table 1), pair by pair:')
    assert [line.split(':')[0] for line in lines[at + 1:at + 6]] == [
        '  - rmoe < hyperrouter', '  - rmoe < mlp', '  - rmoe < random', '  - rmoe < cosine', '  - rmoe < xmoe']
    assert '- XMoE with the GRU < XMoE (RMoE Table 2): holds' in lines
    assert any(line.startswith('- a linear router < the MLP router') and line.endswith('holds') for line in lines)
    assert "- RMoE's cross-layer MI > random's (RMoE Fig. 3), bits between consecutive layers' expert choices: " \
           "reversed" in lines  # (MI here moves with the loss gap: random's is the highest)

def test_verdict_is_paired_seed_by_seed():
    # a small gap that every seed agrees on holds
    p = lab_claims.verdict([-0.010, -0.011, -0.009])
    assert p.verdict == 'holds' and p.agree == 3 and p.n == 3
    assert p.mean == pytest.approx(-0.010) and p.se == pytest.approx(0.001 / np.sqrt(3)) and p.t < -2
    # seeds far apart (std 0.05, ten times the gap) but a consistent-sign small gap: still holds
    b = np.array([1.505, 1.556, 1.604])
    a = b - [0.005, 0.006, 0.004]
    assert 0.005 < 2 * max(analysis.mean_std(a)[1], analysis.mean_std(b)[1])  # the old unpaired rule: noise
    assert lab_claims.verdict(a - b).verdict == 'holds'
    # a sign flip: not decided, however large the mean
    p = lab_claims.verdict([-0.030, 0.012, -0.020])
    assert p.verdict == 'not decided at this scale' and p.agree == 2
    # a consistent gap the other way: reversed
    assert lab_claims.verdict([0.010, 0.012, 0.009]).verdict == 'reversed'
    assert lab_claims.verdict([0.010, 0.012, 0.009], claimed='>').verdict == 'holds'  # "A > B"
    # exactly at 2 SE is not more than 2 SE; a NaN decides nothing
    assert lab_claims.verdict([-1.0, -3.0]).verdict == 'not decided at this scale'  # mean -2, se 1
    assert lab_claims.verdict([-0.01, np.nan, -0.01]).verdict == 'not decided at this scale'
    # one seed: no standard error, no verdict
    p = lab_claims.verdict([-0.5])
    assert p.verdict == 'one seed: not decided' and p.se is None and p.t is None
    assert lab_claims.numbers(p) == '-0.5000 (one seed, no standard error)'


def test_claims_print_the_numbers_they_decided_on():
    def row(kind, val, n_expert=8, **domains):
        return {'kind': kind, 'run': {'n_expert': n_expert}, 'val': list(val), 'domains': domains}
    dense = np.array([1.60, 1.50, 1.55])  # the seeds far apart, the routers' gaps small and paired
    rows = {'remoe': row('remoe', dense - [0.012, 0.010, 0.011], drama=[1.0, 1.1, 1.2]),
            'topk': row('topk', dense - [0.004, -0.002, 0.003], drama=[1.01, 1.11, 1.21]),
            'dense': row('dense', dense, drama=[1.02, 1.09, 1.23]),
            'prototype': row('prototype', dense + [0.010, 0.011, 0.009], drama=[1.0, 1.1, 1.2])}
    lines = lab_claims.claims(rows)
    text = '\n'.join(lines)
    assert lines[0] == '- ReMoE < top-k < dense in validation loss (ReMoE §4.2, Fig. 6), link by link:'
    assert lines[1].startswith('  - remoe < topk: **holds**: remoe 1.5390 vs topk 1.5483; remoe − topk = -0.0093 ± ')
    assert '0.0013 SE, t = -7.0, 3 of 3 seeds agree; per seed -0.0080, -0.0120, -0.0080' in lines[1]
    assert lines[2].startswith('    - on drama: **holds**: remoe 1.100 vs topk 1.110')
    assert lines[3].startswith('  - topk < dense: **not decided at this scale**:') and '2 of 3 seeds agree' in lines[3]
    assert lines[4].startswith('    - on drama: **not decided at this scale**')  # -0.01, +0.02, -0.02
    assert '- expert prototyping < top-k at equal compute (M6-T abstract): **reversed**' in text
    assert len(lines) == 7  # the claims whose runs are missing are left out
    # ReMoE Fig. 6b: the gain at each E, seed by seed
    rows.update({'topk-e16': row('topk', dense, 16), 'remoe-e16': row('remoe', dense - [0.030, 0.028, 0.033], 16)})
    lines = lab_claims.claims(rows)
    at = lines.index("- ReMoE's gain over top-k grows with the number of experts (ReMoE Fig. 6b), E by E:")
    assert lines[at + 1].startswith('  - at E=8: remoe < topk: **holds**: gain (topk − remoe) +0.0093 ± ')
    assert lines[at + 2].startswith('  - at E=16: remoe < topk: **holds**: gain (topk − remoe) +0.0303 ± ')
    assert lines[at + 3].startswith('  - gain at E=8 < gain at E=16: **holds**: difference -0.0210 ± ')
    assert len(lines) == at + 4  # two topk and two remoe runs: the claims that need one of each are left out


def test_trend_claims_pair_the_gain_seed_by_seed():
    """Granularity (ReMoE §4.3) and depth (RMoE Fig. 2): the gain at each value is decided on its
    own, and a gain that grows is decided on the per-seed change of the gain, not on the means."""
    def row(kind, val, **run):
        return {'kind': kind, 'run': {'n_expert': 8, 'n_layer': 4, **run}, 'val': list(val), 'domains': {}}
    base = np.array([1.50, 1.58, 1.54])  # seeds far apart; the gains small and paired
    rows = {'topk': row('topk', base), 'remoe': row('remoe', base - [0.010, 0.012, 0.011]),  # no key: G = 1
            'topk-g4': row('topk', base - 0.02, expert_granularity=4),
            'remoe-g4': row('remoe', base - 0.02 + [0.001, -0.002, 0.002], expert_granularity=4)}
    assert lab_claims.claims(rows) == lab_claims.trend(rows, *lab_claims.TRENDS[1])  # only the granularity claim applies
    lines = lab_claims.trend(rows, *lab_claims.TRENDS[1])
    assert lines[0] == '- ReMoE < top-k at every expert granularity (ReMoE §4.3, Fig. 6c), G by G:'
    assert lines[1].startswith('  - at G=1: remoe < topk: **holds**')
    assert lines[2].startswith('  - at G=4: remoe < topk: **not decided at this scale**')  # a sign flip
    assert len(lines) == 3  # no "grows" line: the claim is that it holds at every G
    # depth: RMoE's gain grows from 4 to 8 layers in every seed, by 0.005-0.006, on seeds 0.08 apart
    rows = {'topk': row('topk', base), 'rmoe': row('topk-recurrent', base + [0.002, -0.001, 0.001]),
            'topk-8': row('topk', base - 0.05, n_layer=8),
            'rmoe-8': row('topk-recurrent', base - 0.05 + [-0.003, -0.007, -0.004], n_layer=8)}
    lines = lab_claims.trend(rows, *lab_claims.TRENDS[2])
    assert lines[1].startswith('  - at layers=4: topk-recurrent < topk: **not decided at this scale**')
    assert lines[2].startswith('  - at layers=8: topk-recurrent < topk: **holds**')
    assert lines[3].startswith('  - gain at layers=4 < gain at layers=8: **holds**: difference -0.0053 ± ')
    assert lab_claims.trend({'topk': rows['topk'], 'rmoe': rows['rmoe']}, *lab_claims.TRENDS[2]) == []  # one depth


def test_report_claims_of_m6t():
    """M6-T's findings, looked up by kind and setting: k against k and against dense of its active size,
    capacity against capacity, no balancing against the aux loss, prototyping against top-k at its best."""
    def row(kind, gap, k=2, cf=0.0, hidden=256):
        return {'kind': kind, 'run': {'top_k': k, 'capacity_factor': cf, 'ffn_hidden': hidden},
                'val': list(np.array([1.50, 1.55, 1.60]) + gap), 'domains': {}}
    def heads(rows):
        return [line.split(':')[0] + ': ' + line.split('**')[1] if '**' in line else line for line in lab_claims.claims(rows)]
    rows = {'topk-k1': row('topk', 0.03, k=1), 'topk': row('topk', 0.0), 'topk-k4': row('topk', -0.02, k=4),
            'dense-k1': row('dense', 0.04, hidden=256), 'dense': row('dense', 0.02, hidden=512),
            'dense-k4': row('dense', -0.03, hidden=1024),
            'cf1': row('topk', 0.02, cf=1.0), 'cf2': row('topk', [0.001, -0.001, 0.0], cf=2.0),
            'noaux': row('topk-noaux', [0.002, -0.001, 0.001]),
            'topk-norenorm': row('topk-norenorm', 0.01), 'prototype': row('prototype', 0.03),
            'prototype-norenorm': row('prototype-norenorm', 0.02)}
    lines = heads(rows)
    at = lines.index('- more active experts help top-k (M6-T abstract), k by k:')
    assert lines[at + 1:at + 3] == ['  - topk < topk-k1: holds', '  - topk-k4 < topk: holds']
    at = lines.index('- ... beyond their compute: top-k < dense of the same active size, at each k (what "helps" '
                     'means here; M6-T abstract), k by k:')
    assert lines[at + 1:at + 4] == ['  - topk-k1 < dense-k1: holds', '  - topk < dense: holds',
                                    '  - topk-k4 < dense-k4: reversed']
    at = lines.index('- capacity matters: a larger capacity, a lower loss (M6-T abstract), capacity by capacity:')
    assert lines[at + 1:at + 3] == ['  - topk < cf2: not decided at this scale', '  - cf2 < cf1: holds']
    assert '- the aux loss < no balancing, which M6-T finds no significant problem for quality (not decided is ' \
           'consistent) (M6-T abstract): not decided at this scale' in lines
    assert '- expert prototyping < top-k, each at its better renormalisation (M6-T abstract): reversed' in lines
