"""
The router lab: train a list of configs x seeds on one dataset with the same tokens and steps,
then write a results table and plots of what each router does.

    python bakeoff.py                  # every router, 3 seeds, multidomain bytes -> results/default/
    python bakeoff.py --quick          # every router, 1 seed, 600 steps          -> results/quick/
    python bakeoff.py --runs=topk,remoe --set=n_expert=16 --name=e16
    python bakeoff.py --jobs=1                 # one run at a time (default: 2 on a CPU of 2+ cores, one a GPU)
    python bakeoff.py --runs="base:remoe,slow:remoe+remoe_alpha=1.1" --dataset=shakespeare_char --name=alpha
    python bakeoff.py --print > jobs.txt      # one train.py command per run, for a scheduler (SLURM...)

A run entry is [label:]config[+key=value...]: a config file, named as train.py takes it (topk,
configs/topk.py, ...), with train.py overrides of its own (the label names it in tables and
plots; by default the entry itself). Every run gets the same dataset, steps, evaluation and --set
overrides; its seed sets both its initialisation and its data order, so seed s of every entry
sees the same batches. Each run is train.py in a subprocess, writing
results/<name>/runs/<label>-s<seed>/ (log.jsonl, ckpt.pt, train.log). Finished runs are reused
and interrupted ones resumed, so a bake-off stopped with Ctrl-C continues where it stopped; a
folder made with other settings is refused, never overwritten, and so is a run whose logged config
differs from what its entry gives now (a config file changed since the study ran). A finished run folder copied from
another bake-off with the same settings is reused as it is. A finished run whose log ends without a
final score over every validation token (made before train.py had one) stops the bake-off before
any training, with the command that re-scores it (python train.py --init_from=resume
--out_dir=RUN --eval_only=True --compile=False: no training, the checkpoint not rewritten);
--rescore runs those commands itself.

Beyond one machine: the runs are independent. --print writes each unfinished run's folder and prints
its train.py command, one line a run, without training: hand the lines to any scheduler (a SLURM job
array runs line $SLURM_ARRAY_TASK_ID; docs/lab.md has the script). The same bake-off command without
--print then takes every run those commands finished as done, trains what is left and writes the
report. On a machine with several GPUs, --jobs=N (default: one a GPU) runs N at a time, each on a GPU
of its own (CUDA_VISIBLE_DEVICES).

This file is the entry point; the lab's internals are the package lab/: lab.analysis (the numbers
of a run), lab.report (results.md), lab.claims (the papers' claims decided on the numbers), lab.verdict
(the one rule that decides them) and lab.plots (the figures).
"""
import argparse
import contextlib
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import configurator
import data
from lab import analysis, report

REPO = Path(__file__).resolve().parent
# remoe-recurrent takes configs/rmoe.py's recurrent router (width 64, PyTorch's init): like for like with rmoe
DEFAULT_RUNS = ('dense,topk,topk-bias:topk+balance=bias,remoe,rmoe,'
                'remoe-recurrent:remoe+recurrent_router=True+rmoe_dim=64+rmoe_init=torch,prototype')


class LabError(Exception):
    """A one-line message: what is wrong and what to do."""


def parse_runs(text):
    """'[label:]config[+key=value...]' entries, comma-separated -> [(label, config path, [--k=v])]."""
    runs = []
    for entry in (e.strip() for e in text.split(',') if e.strip()):
        label, _, spec = entry.rpartition(':') if ':' in entry.split('+')[0] else ('', '', entry)
        config, *overrides = spec.split('+')
        try:  # train.py's own rule, so an entry names the file train.py would run
            path = config_path(configurator.find_config(config))
        except configurator.ConfigError as e:
            raise LabError(f"run {entry!r}: {e}") from None
        bad = [o for o in overrides if '=' not in o]
        if bad:
            raise LabError(f"run {entry!r}: {bad[0]!r} is not key=value (entries are [label:]config[+key=value...])")
        label = label or spec
        if not label or any(c in label for c in '/ \t'):
            raise LabError(f"run {entry!r}: the label {label!r} must be non-empty, without '/' or spaces")
        runs.append((label, path, [f'--{o}' for o in overrides]))
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels):
        raise LabError(f"two runs have the same label in {text!r}: label them, as in 'a:topk,b:topk+top_k=1'")
    if not runs:
        raise LabError("--runs is empty: name at least one config, e.g. --runs=topk,remoe")
    return runs


def config_path(path):
    """How a run names its config file: relative to the repo for one of its files ('configs/topk.py';
    train.py runs in REPO), absolute for any other, so that a run folder still names the same config
    when the repo is cloned or moved elsewhere."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def train_argv(config, overrides, common, seed, out_dir):
    return [config, *common, *overrides, f'--seed={seed}', f'--out_dir={out_dir}']


def run_train(argv, log_path, env=None):
    """train.py in a subprocess, its output appended to log_path; returns the exit code. Ctrl-C
    reaches it too (same process group): it saves a checkpoint and exits, and so does this."""
    with open(log_path, 'a') as log:
        proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *argv], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise


def last_line(path):
    lines = [line for line in Path(path).read_text(errors='replace').splitlines() if line.strip()]
    return lines[-1] if lines else '(no output)'


def dry_run(label, config, overrides, common):
    """Check an entry cheaply before hours of training: train.py itself, for zero steps, eagerly.
    Returns the config it resolved (its log's run record)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [config, *common, *overrides, f'--out_dir={tmp}/out', '--max_iters=0', '--eval_iters=1',
                '--compile=False']
        proc = subprocess.run([sys.executable, str(REPO / 'train.py'), *argv], capture_output=True, text=True,
                              cwd=REPO)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = lines[-1] if lines else f'exit code {proc.returncode}'
            raise LabError(f"run {label!r} does not start: {why.removeprefix('error: ')}")
        return analysis.read_log(f'{tmp}/out').run


# What may differ between a run folder's logged config and its entry's config now: where and how the
# run was driven (paths, evaluation, device, compile, dispatch backend, process layout) and what the
# dry run itself sets, never what it trains. batch_size and accumulation are per process: tokens_per_iter,
# compared, is the global batch.
NOT_THE_RECIPE = ('out_dir', 'init_from', 'data_dir', 'max_iters', 'lr_decay_iters', 'eval_interval', 'log_interval',
                  'eval_iters', 'eval_only', 'always_save_checkpoint', 'sample_tokens', 'device', 'dtype', 'compile',
                  'expert_impl', 'ep_size', 'dist_timeout', 'max_skipped_steps', 'ec_eval', 'seed', 'batch_size',
                  'gradient_accumulation_steps', 'world_size', 'params', 'active_params', 'domains')


def check_recipe(out, label, config, recipe):
    """A run folder trained (or begun) under another config than its entry gives now, e.g. a config file
    changed since the study ran, is refused: reusing it would mix two recipes under one label. Keys
    that the older log lacks are skipped (it ran before they existed)."""
    if not (out / 'log.jsonl').exists():
        return
    then = analysis.read_log(out).run
    diff = [k for k in recipe if k in then and k not in NOT_THE_RECIPE and then[k] != recipe[k]]
    if diff:
        what = ', '.join(f'{k}={then[k]!r}' for k in diff)
        now = ', '.join(f'{k}={recipe[k]!r}' for k in diff)
        raise LabError(f"{out} was trained with {what}, but entry {label!r} ({config}) now gives {now}: its config "
                       f"changed since; run the study under a new --name (or at the commit that made it)")


def check_folder(folder, settings):
    """A results folder holds one setting: refuse to mix runs made with another."""
    path = folder / 'bakeoff.json'
    if path.exists():
        old = json.loads(path.read_text())
        if old['common'] != settings['common']:
            diff = sorted(set(old['common']) ^ set(settings['common']))
            raise LabError(f"{folder} holds a bake-off made with other settings ({' '.join(diff)}): "
                           f"pass --name=<a new name> or delete {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def finished_elsewhere(out, state, max_iters):
    """A run that a printed command trained (--print: a scheduler ran train.py itself): its folder's
    run.json still says not done, while its log ends with the final score at the last step. Marked
    done here, its time taken from the log (the logged steps' times: training, not queueing)."""
    if state is None or state['done'] or not (out / 'log.jsonl').exists():
        return False
    log = analysis.read_log(out)
    final = analysis.final_score(log)
    if final is None or final['iter'] != max_iters:
        return False
    tokens = log.run['tokens_per_iter']
    state.update(done=True, seconds=sum(tokens / r['tokens_per_sec'] for r in log.steps if r.get('tokens_per_sec')))
    (out / 'run.json').write_text(json.dumps(state, indent=1))
    return True


def gpu_slots(jobs):
    """With several GPUs, a queue of GPU ids that the running jobs take and give back, so that each run
    has a GPU of its own (with more jobs than GPUs, they share in turn); None otherwise."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return None
    slots = queue.Queue()
    for i in range(jobs):
        slots.put(i % n)
    return slots


def print_commands(folder, runs, seeds, common):
    """--print: each unfinished run's folder and run.json made, its train.py command printed (to stdout,
    one a line; what is already done to stderr)."""
    for label, config, overrides in runs:
        for seed in seeds:
            out = folder / 'runs' / f'{label}-s{seed}'
            argv = train_argv(config, overrides, common, seed, out.resolve())
            state_path = out / 'run.json'
            state = json.loads(state_path.read_text()) if state_path.exists() else None
            if state and (state['done'] or finished_elsewhere(out, state, max_iters_of(common))):
                print(f"{out.name}: done", file=sys.stderr)
                continue
            out.mkdir(parents=True, exist_ok=True)
            if state is None:
                state_path.write_text(json.dumps({'argv': [str(a) for a in argv], 'done': False, 'seconds': 0.0},
                                                 indent=1))
            resume = ['--init_from=resume'] if (out / 'ckpt.pt').exists() else []
            # this bake-off's own interpreter (a virtual environment's python, on a shared file system)
            print(shlex.join(['cd', str(REPO)]) + ' && ' + shlex.join([
                sys.executable, 'train.py', *map(str, argv), *resume]) + f" >> {shlex.quote(str((out / 'train.log').resolve()))} 2>&1")


def max_iters_of(common):
    return int(next(a for a in common if a.startswith('--max_iters=')).split('=', 1)[1])


def train_all(folder, runs, seeds, common, jobs=1):
    """Train every (run, seed) not yet finished, `jobs` at a time, one line each with an ETA."""
    work = [(label, config, overrides, seed) for label, config, overrides in runs for seed in seeds]
    durations, lock, failed = [], threading.Lock(), threading.Event()
    gpus = gpu_slots(jobs)

    def done(label, seed):
        out = folder / 'runs' / f'{label}-s{seed}'
        state = json.loads((out / 'run.json').read_text()) if (out / 'run.json').exists() else None
        return state is not None and (state['done'] or finished_elsewhere(out, state, max_iters_of(common)))
    left = [sum(not done(label, seed) for label, _, _, seed in work)]  # runs still to train, for the ETA
    # train.py's threads share the cores: each of `jobs` runs gets its share (on 2 cores two runs of
    # one thread train ~1.5x the tokens of one run of two, but each run's tokens/s is then lower)
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', str(max(1, os.cpu_count() // jobs)))}

    def train(n, *job):
        if failed.is_set():  # a run before this one failed: start nothing new
            return
        try:
            train_one(n, *job)
        except BaseException:
            failed.set()
            raise

    def train_one(n, label, config, overrides, seed):
        name = f'{label}-s{seed}'
        out = folder / 'runs' / name
        argv = train_argv(config, overrides, common, seed, out)
        state_path = out / 'run.json'
        state = json.loads(state_path.read_text()) if state_path.exists() else None
        # where a run lives is not how it was trained: a finished run copied from another bake-off
        # (or another clone of the repo) with the same settings is reused
        def how(args):
            config, *rest = [str(a) for a in args if not str(a).startswith('--out_dir=')]
            legacy = Path(config)  # recorded before config_path: absolute, maybe in another clone
            if legacy.is_absolute() and legacy.parent.name == 'configs' and (legacy.parents[1] / 'train.py').exists():
                config = f'configs/{legacy.name}'
            return [config, *rest]
        if state and how(state['argv']) != how(argv):
            raise LabError(f"{out} was trained with another command ({' '.join(state['argv'])}): "
                           f"give this entry another label or delete that folder")
        if state and (state['done'] or finished_elsewhere(out, state, max_iters_of(common))):
            print(f"[{n}/{len(work)}] {name}: done before ({analysis.fmt_minutes(state['seconds'])})")
            return
        resume = state is not None and (out / 'ckpt.pt').exists()
        with lock:
            eta = (f", bake-off ETA {analysis.fmt_minutes(sum(durations) / len(durations) * left[0] / jobs)}"
                   if durations else '')
        print(f"[{n}/{len(work)}] {name}: {'resuming' if resume else 'training'}{eta}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        state = state or {'argv': [str(a) for a in argv], 'done': False, 'seconds': 0.0}
        state_path.write_text(json.dumps(state, indent=1))
        t0 = time.time()
        gpu = gpus.get() if gpus else None
        try:
            rc = run_train(argv + (['--init_from=resume'] if resume else []), out / 'train.log',
                           env if gpu is None else {**env, 'CUDA_VISIBLE_DEVICES': str(gpu)})
        finally:
            if gpu is not None:
                gpus.put(gpu)
        state['seconds'] += time.time() - t0
        state_path.write_text(json.dumps(state, indent=1))
        if rc != 0:
            raise LabError(f"{name} stopped (exit code {rc}): {last_line(out / 'train.log')} "
                           f"(whole log: {out / 'train.log'}; run again to resume)")
        state['done'] = True
        state_path.write_text(json.dumps(state, indent=1))
        with lock:
            durations.append(time.time() - t0)
            left[0] -= 1
        final = analysis.final_score(analysis.read_log(out))
        if final is None:
            raise LabError(f"{name} finished without a final score over every validation token "
                           f"(is train.py older than the bake-off?): see {out / 'train.log'}")
        print(f"[{n}/{len(work)}] {name}: val loss {final['val_loss']:.4f} in "
              f"{analysis.fmt_minutes(time.time() - t0)}", flush=True)

    # in order, `jobs` at a time; the first failure stops new runs, the running ones finish
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train, n, *job) for n, job in enumerate(work, 1)]
        try:
            for future in futures:
                future.result()
        except BaseException:  # a LabError, or Ctrl-C (which the runs get too: they save and exit)
            failed.set()
            raise


def rescore_stale(folder, runs, seeds, rescore):
    """Finished runs made before train.py scored every validation token (their log ends with a
    sampled val loss) are never mixed with new ones: with rescore, each checkpoint is scored again
    on the whole split by train.py --eval_only (no training, the checkpoint not rewritten);
    without, the bake-off lists them with the commands and stops."""
    finished = []
    for label, _, _ in runs:
        for seed in seeds:
            out = folder / 'runs' / f'{label}-s{seed}'
            state = out / 'run.json'
            if state.exists() and json.loads(state.read_text())['done']:
                finished.append(out)
    stale = report.unscored(finished)
    if stale and not rescore:
        for out in stale:
            print(f"{out.name}: no final score over every validation token; re-score: {report.rescore_command(out)}")
        raise LabError(f"{len(stale)} finished run(s) of {folder} were scored before the full-split final score "
                       f"(listed above, with the commands that re-score them without training): run those, or "
                       f"run this bake-off again with --rescore")
    for n, out in enumerate(stale, 1):
        old = analysis.final_eval(analysis.read_log(out))['val_loss']
        print(f"[re-score {n}/{len(stale)}] {out.name}: every validation token, no training", flush=True)
        rc = run_train(report.rescore_argv(os.path.abspath(out)), out / 'train.log')
        final = analysis.final_score(analysis.read_log(out)) if rc == 0 else None
        if final is None:
            raise LabError(f"re-scoring {out.name} failed (exit code {rc}): {last_line(out / 'train.log')} "
                           f"(whole log: {out / 'train.log'})")
        print(f"[re-score {n}/{len(stale)}] {out.name}: val loss {old:.4f} (sampled) -> {final['val_loss']:.4f} "
              f"({final['val_tokens']:,} tokens)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default=DEFAULT_RUNS, help=f"[label:]config[+key=value...], comma-separated "
                   f"(default: {DEFAULT_RUNS})")
    p.add_argument('--seeds', type=int, default=None, help='seeds per run (default 3, --quick 1)')
    p.add_argument('--jobs', type=int, default=None, help='runs trained at a time, sharing the cores (default: '
                   '2 on a CPU of 2 or more cores, where two one-thread runs do ~1.5x the work of one on two; one a '
                   'GPU, each run on a GPU of its own)')
    p.add_argument('--dataset', default='multidomain', help="every run's dataset (default multidomain)")
    p.add_argument('--max_iters', type=int, default=None, help='training steps per run (default 1500, --quick 600)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='a train.py override for every run (repeatable)')
    p.add_argument('--quick', action='store_true', help='a first look: 1 seed, 600 steps, results/quick')
    p.add_argument('--name', default=None, help='results/<name> (default: default, or quick)')
    p.add_argument('--results', default='results', help='the folder holding every bake-off')
    p.add_argument('--data_dir', default='data')
    p.add_argument('--no_plots', action='store_true', help='the table only (needs no matplotlib)')
    p.add_argument('--print', action='store_true', help="print each unfinished run's train.py command (for a "
                   "scheduler) instead of training; the same command without --print then collects them")
    p.add_argument('--rescore', action='store_true', help='score again, on every validation token, the '
                   'finished runs made before train.py did so (no training); without it such runs stop the bake-off')
    args = p.parse_args(argv)
    if args.jobs is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        args.jobs = gpus or (2 if (os.cpu_count() or 1) >= 2 else 1)
    seeds = args.seeds or (1 if args.quick else 3)
    max_iters = args.max_iters or (600 if args.quick else 1500)
    folder = Path(args.results) / (args.name or ('quick' if args.quick else 'default'))
    try:
        if seeds < 1 or max_iters < 1 or args.jobs < 1:
            raise LabError(f"--seeds={seeds}, --max_iters={max_iters} and --jobs={args.jobs} must be positive")
        runs = parse_runs(args.runs)
        bad = [s for s in args.set if '=' not in s]
        if bad:
            raise LabError(f"--set={bad[0]!r} is not key=value")
        if not args.no_plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise LabError("the plots need matplotlib: pip install matplotlib, or pass --no_plots") from None
        data_dir = os.path.abspath(args.data_dir)
        try:  # once, here: one clear error instead of one per run (--print: stdout holds only the commands)
            with contextlib.redirect_stdout(sys.stderr) if args.print else contextlib.nullcontext():
                data.prepare(args.dataset, data_dir)
        except data.DataError as e:
            raise LabError(f"dataset {args.dataset!r} cannot be prepared: {e}") from None
        common = [f'--dataset={args.dataset}', f'--data_dir={data_dir}', f'--max_iters={max_iters}',
                  f'--eval_interval={max(1, max_iters // 10)}', '--eval_iters=40', '--log_interval=1',
                  '--sample_tokens=0', *[f'--{s}' for s in args.set]]
        # the command that makes these results (--rescore only mends older runs: not part of it)
        made_by = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ('--rescore', '--print')]
        check_folder(folder, {'common': common, 'argv': made_by})
        seeds = [1337 + i for i in range(seeds)]
        for label, config, overrides in runs:  # every entry: a new one must start, an old one must not have changed
            recipe = dry_run(label, config, overrides, common)
            for seed in seeds:
                check_recipe(folder / 'runs' / f'{label}-s{seed}', label, config, recipe)
        rescore_stale(folder, runs, seeds, args.rescore)  # before any training: old scores never mix with new
        if args.print:
            print_commands(folder, runs, seeds, common)
            return
        train_all(folder, runs, seeds, common, args.jobs)
        report.write(folder, runs, seeds, plots=not args.no_plots)
    except (LabError, report.ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: the runs saved checkpoints; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()
