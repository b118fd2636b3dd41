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
import torch

from lab import analysis

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


def test_expert_similarity_reads_each_layers_experts_from_the_checkpoint(tmp_path):
    D, H = 4, 3
    same = torch.randn(1, D, 2 * H).repeat(3, 1, 1), torch.randn(1, H, D).repeat(3, 1, 1)  # 3 equal experts
    apart = torch.zeros(2, D, 2 * H), torch.zeros(2, H, D)  # 2 experts on disjoint weights: orthogonal
    apart[0][0, 0, 0], apart[1][1, 0, 0] = 1.0, -2.0
    state = {'transformer.h.0.mlp.experts.w_in': same[0], 'transformer.h.0.mlp.experts.w_out': same[1],
             'transformer.h.1.mlp.router.w_g.weight': torch.randn(2, D),
             'transformer.h.1.mlp.experts.w_in': apart[0], 'transformer.h.1.mlp.experts.w_out': apart[1],
             'transformer.h.1.mlp.shared.w_in': torch.randn(1, D, 2 * H)}  # shared experts are left out
    torch.save({'model': state, 'model_args': {}}, tmp_path / 'ckpt.pt')
    assert analysis.expert_similarity(tmp_path) == pytest.approx([1.0, 0.0], abs=1e-6)
    torch.save({'model': {'transformer.h.0.mlp.w_in': torch.randn(D, 2 * H)}, 'model_args': {}}, tmp_path / 'ckpt.pt')
    assert analysis.expert_similarity(tmp_path) is None  # dense


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
                   '## Paper claims at this scale', 'rare tokens get more experts under ReMoE',
                   'expert weights, mean cosine |\n|---|---|---|---|---|\n| topk |'):  # the softmax router's gates
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
    # ... but not once its config file has changed since (here: the run's logged config says another rate)
    log_text = (run / 'log.jsonl').read_text()
    records = [json.loads(line) for line in log_text.splitlines()]
    records[0]['run']['router_lr_scale'] = 0.5
    (run / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    changed = lab(tmp_path, *args, '--no_plots', ok=False)
    one_line_error(changed, f"{run} was trained with router_lr_scale=0.5, but entry 'remoe'")
    one_line_error(changed, "now gives router_lr_scale=0.25: its config changed since; run the study under a new --name")
    (run / 'log.jsonl').write_text(log_text)
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
    assert report.kind({**base, 'router': 'remoe', 'balance': 'none', 'n_shared_expert': 1}) == 'remoe-noaux-shared'
    # the runs of the modern-router and Table 5 studies are told apart
    deepseek = {**base, 'score': 'sigmoid', 'balance': 'bias', 'seq_aux_coef': 1e-4}
    assert report.kind(deepseek) == 'topk-sigmoid-bias-seqaux'
    assert report.kind({**base, 'dense_grad': True, 'dense_grad_forward': False}) == 'topk-densegrad'
    assert report.kind({**base, 'dense_grad': True, 'dense_grad_forward': True}) == 'topk-densegrad-fwd'
    assert report.kind({**base, 'dense_grad': True}) == 'topk-densegrad-fwd'  # logged before the switch existed
    flows = [report.kind({**base, 'recurrent_router': True, 'rmoe_flow': f}) for f in ('pass', 'detach', 'none')]
    assert flows == ['topk-recurrent', 'topk-recurrent-detach', 'topk-recurrent-np']
