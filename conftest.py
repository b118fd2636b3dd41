"""
What every test file shares: the hypothesis profile, Triton's interpreter on machines without a
GPU, the default dataset prepared once per session, and helpers that run the real entry points
(train.py, sample.py) in subprocesses on a tiny model.
"""
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run under the interpreter, which is read when kernels.py is
# imported: it is set here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# The suite runs one pytest-xdist worker a core (README: `-n auto`). Each worker, and every train.py,
# sample.py or bakeoff.py it starts (they inherit OMP_NUM_THREADS), takes its share of the cores:
# PyTorch's default of a thread a core in every worker would oversubscribe them, and its threads spin.
_workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _workers > 1:
    os.environ.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // _workers)))
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

settings.register_profile('repo', max_examples=30, deadline=None)
settings.load_profile('repo')

REPO = Path(__file__).resolve().parent
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--ffn_hidden=32', '--n_expert=4', '--top_k=2',
        '--block_size=32', '--batch_size=4', '--eval_iters=2', '--sample_tokens=0', '--compile=False']


def run(script, *args, cwd, ok=True, env=None, launcher=()):
    """A script of the repo in a subprocess; asserts it succeeded unless ok=False."""
    proc = subprocess.run([*(launcher or [sys.executable]), str(REPO / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if ok:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def router_config(router, **config):
    """A GPTConfig dict for `router` from a test's shape: top_k capped where the router caps it (Hash: 1)."""
    from model import ROUTERS
    cap = ROUTERS[router].top_k_max
    if cap is not None and config.get('top_k', 2) > cap:
        config['top_k'] = cap
    return {**config, 'router': router}


def read_log(out_dir):
    """Every record of out_dir/log.jsonl, in order."""
    return [json.loads(line) for line in (Path(out_dir) / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """The default dataset, prepared once for the whole session by train.py itself."""
    d = tmp_path_factory.mktemp('data')
    run('train.py', *TINY, f'--data_dir={d}', '--max_iters=0', f'--out_dir={d}/warmup', cwd=d)
    assert (d / 'shakespeare_char' / 'train.bin').exists() and (d / 'shakespeare_char' / 'meta.json').exists()
    return d


def regression_steps(moe, x, target, steps, lr=3e-3):
    """A model.MoE layer learning to map x to target with AdamW, its router updated after every
    step as train.py does; yields each step's routing stats (the toy problems of the router tests)."""
    opt = torch.optim.AdamW(moe.parameters(), lr=lr)
    for _ in range(steps):
        y, aux_loss, stats, _ = moe(x, None)
        ((y - target).square().mean() + aux_loss).backward()
        opt.step()
        opt.zero_grad()
        moe.router.update(stats['sparsity'], stats['load'])
        yield stats


def train(tmp, data_dir, *args, **kw):
    """train.py on the tiny model and the session's data."""
    return run('train.py', *TINY, f'--data_dir={data_dir}', *args, cwd=tmp, **kw)


def run_in_process(monkeypatch, argv):
    """train.py in this process, so that a test can reach inside it (monkeypatch); returns its exit
    code (0 if it ended without sys.exit)."""
    monkeypatch.setattr(sys, 'argv', ['train.py', *argv])
    try:
        runpy.run_path(str(REPO / 'train.py'), run_name='__main__')
        return 0
    except SystemExit as e:
        return e.code
    finally:  # train.py hands Ctrl-C and SIGTERM to a thread of its own: give them back to pytest
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def start(tmp_path, data_dir, *args):
    """train.py on the tiny model in the background (a Popen, for signals and kills)."""
    cmd = [sys.executable, str(REPO / 'train.py'), *TINY, f'--data_dir={data_dir}', *args]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out_dir, it, proc, timeout=120):
    """Block until out_dir's log has iteration `it` (the run is training)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out_dir / 'log.jsonl').exists() and any(r.get('iter', -1) >= it and 'loss' in r
                                                    for r in read_log(out_dir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f'no iteration {it} in {out_dir} after {timeout}s')
