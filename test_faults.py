"""
Faults that could lose a user's work, each tried for real: a run that diverges, Ctrl-C / SIGTERM
(once, and twice), SIGKILL during checkpoint writes and in the middle of training, and input that
would otherwise crash late or be silently ignored.
"""
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import distributed
from conftest import REPO, TINY, read_log, run, run_in_process, start, train, wait_for_step
from checkpoint import all_finite, load_checkpoint


def steps_of(out_dir):
    """{iteration: loss} of the logged steps; a resumed run logs some twice, and the later wins."""
    return {r['iter']: r['loss'] for r in read_log(out_dir) if 'loss' in r}


def test_a_diverged_run_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    out = tmp_path / 'out'
    train(tmp_path, data_dir, '--max_iters=10', '--eval_interval=5', f'--out_dir={out}')
    good = torch.load(out / 'ckpt.pt', weights_only=True)
    proc = train(tmp_path, data_dir, '--init_from=resume', '--max_iters=40', '--eval_interval=5', '--log_interval=1',
                 '--learning_rate=1e6', '--grad_clip=0', f'--out_dir={out}', ok=False)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: training diverged at iteration '), proc.stderr
    assert f'the last good checkpoint is {out}/ckpt.pt from iteration 10' in lines[0]
    assert 'skipped, gradient norm nan' in proc.stdout and 'not saving iteration 15' in proc.stdout
    ckpt = load_checkpoint(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 10 and all_finite(ckpt['model']) and all_finite(ckpt['optimizer']['state'])
    assert all(torch.equal(ckpt['model'][k], v) for k, v in good['model'].items())


@pytest.mark.parametrize('max_skipped', [5, 0])
def test_one_bad_step_is_skipped_and_training_goes_on(tmp_path, data_dir, monkeypatch, capsys, max_skipped):
    """A NaN gradient norm at iteration 3 only (as from one bad batch): the step is skipped, its
    update and λ's never applied, and the run finishes; with max_skipped_steps=0 it stops there."""
    clip = distributed.clip_grad_norm_
    calls = []

    def norm_nan_once(model, max_norm, d):
        calls.append(1)
        norm = clip(model, max_norm, d)
        return torch.tensor(float('nan')) if len(calls) == 4 else norm  # iteration 3
    monkeypatch.setattr(distributed, 'clip_grad_norm_', norm_nan_once)
    code = run_in_process(monkeypatch, [*TINY, '--router=remoe', '--remoe_lambda_floor=False', '--max_iters=6',
                                        '--eval_interval=3', '--log_interval=1', f'--max_skipped_steps={max_skipped}',
                                        f'--data_dir={data_dir}', f'--out_dir={tmp_path}/out'])
    out, err = capsys.readouterr()
    assert 'iter 3: skipped, gradient norm nan (1 in a row)' in out
    log = [r for r in read_log(tmp_path / 'out') if 'loss' in r]
    if max_skipped:
        assert code == 0 and load_checkpoint(tmp_path / 'out' / 'ckpt.pt')['iter_num'] == 6
        lam = {r['iter']: r['lambda'] for r in log}
        assert lam[3] == lam[2] and lam[4] != lam[3]  # the skipped step left λ alone
    else:
        assert code == 4 and 'training diverged at iteration 3' in err and 'from iteration 3' in err
        assert max(r['iter'] for r in log) == 2


def test_sigterm_saves_without_evaluating_and_a_second_one_stops_at_once(tmp_path, data_dir):
    # steps of seconds (~4 s on 2 cores in 2026-12): the second signal below must land mid-step, 1.2 s after the
    # first (at --batch_size=4 a step took 0.95 s on an idle machine, and the run saved and exited before it)
    slow = ['--block_size=8192', '--batch_size=16', '--max_iters=1000', '--eval_interval=500', '--log_interval=1']
    out = tmp_path / 'once'
    proc = start(tmp_path, data_dir, *slow, f'--out_dir={out}')
    wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and 'SIGTERM: stopping after this micro-step' in stdout
    saved = load_checkpoint(out / 'ckpt.pt')['iter_num']
    assert saved >= 2 and [r['iter'] for r in read_log(out) if 'val_loss' in r] == [0]  # no evaluation
    assert max(r['iter'] for r in read_log(out) if 'loss' in r) == saved - 1

    out = tmp_path / 'twice'
    proc = start(tmp_path, data_dir, *slow, f'--out_dir={out}')
    wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.2)  # signals within a second of each other count once (torchrun sends two)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 0.5 and proc.returncode == 128 + signal.SIGTERM, stderr
    assert 'SIGTERM: stopping now, without saving' in stderr and not (out / 'ckpt.pt').exists()


def test_a_stop_in_a_long_accumulated_step_comes_within_a_micro_step(tmp_path, data_dir):
    """100,000 micro-steps in a step (minutes of work): a SIGTERM in its middle ends the run within
    seconds, with the state before that step saved (it once waited for the whole step: 8 minutes and on)."""
    out = tmp_path / 'long'
    proc = start(tmp_path, data_dir, '--gradient_accumulation_steps=100000', '--max_iters=2', f'--out_dir={out}')
    t0 = time.time()
    evaluated = lambda: (out / 'log.jsonl').exists() and any('val_loss' in r for r in read_log(out))
    while not evaluated():  # the evaluation at iteration 0 is done: the first step is under way
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert time.time() - t0 < 30 and 'stopped in the middle of iteration 0 (micro-step ' in stdout, stdout
    assert load_checkpoint(out / 'ckpt.pt')['iter_num'] == 0


def test_a_stop_mid_step_resumes_to_the_uninterrupted_losses(tmp_path, data_dir):
    """The partial step is dropped and the data order rewound to its start: resumed, the run replays
    that step whole and every loss equals the uninterrupted run's."""
    common = ['--max_iters=3', '--eval_interval=100', '--log_interval=1', '--warmup_iters=1',
              '--gradient_accumulation_steps=300', '--router=remoe', '--remoe_lambda_floor=False']
    train(tmp_path, data_dir, *common, f'--out_dir={tmp_path}/straight')
    out = tmp_path / 'stopped'
    proc = start(tmp_path, data_dir, *common, f'--out_dir={out}')
    wait_for_step(out, 1, proc)  # iteration 1 is logged: iteration 2, 300 micro-steps, has begun
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and 'stopped in the middle of iteration 2' in stdout, stdout
    ckpt = load_checkpoint(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 2 and max(steps_of(out)) == 1
    train(tmp_path, data_dir, *common, '--init_from=resume', f'--out_dir={out}')
    straight, resumed = steps_of(tmp_path / 'straight'), steps_of(out)
    assert sorted(resumed) == list(range(3))
    for it in range(3):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5), it
    lam = lambda d: [r['lambda'] for r in read_log(d) if 'loss' in r][-1]
    assert lam(out) == lam(tmp_path / 'straight')  # λ saw each step once


WRITER = """
import sys, torch
from checkpoint import save_checkpoint
for v in range(1, 10**6):  # checkpoints of ~12 MB, version v everywhere, as fast as they can be written
    save_checkpoint({'v': v, 'w': torch.full((3_000_000,), float(v)), 'meta': {'v': v}}, sys.argv[1])
    print(v, flush=True)
"""


def test_checkpoints_survive_sigkill_at_any_instant(tmp_path):
    """A process that does nothing but write checkpoints, killed 20 times at random instants: the
    checkpoint on disk always loads, whole, and is the last version written or the next one."""
    path = tmp_path / 'ckpt.pt'
    rng = random.Random(0)
    corrupt, kills, mid_write = 0, 0, 0
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, '-c', WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # torch imported and one checkpoint written: now kill it mid-write
        time.sleep(rng.uniform(0, 0.4))
        proc.kill()
        written = proc.communicate()[0].split()
        kills += 1
        last = int(written[-1]) if written else 1
        tmp = path.with_name('ckpt.pt.tmp')
        if tmp.exists():  # the kill came in the middle of a write
            mid_write += 1
            tmp.unlink()
        try:
            ckpt = torch.load(path, weights_only=True)
        except Exception:
            corrupt += 1
            continue
        assert ckpt['v'] in (last, last + 1) and ckpt['meta']['v'] == ckpt['v']
        assert torch.equal(ckpt['w'], torch.full((3_000_000,), float(ckpt['v'])))
    assert kills == 20 and corrupt == 0 and mid_write >= 5


def test_resume_after_sigkill_mid_step_gives_the_uninterrupted_losses(tmp_path, data_dir):
    common = ['--max_iters=40', '--eval_interval=8', '--log_interval=1', '--warmup_iters=2', '--block_size=256']
    train(tmp_path, data_dir, *common, f'--out_dir={tmp_path}/straight')
    out = tmp_path / 'killed'
    proc = start(tmp_path, data_dir, *common, f'--out_dir={out}')
    wait_for_step(out, 10, proc)  # past the checkpoint of iteration 8
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed while training, not finished
    assert load_checkpoint(out / 'ckpt.pt')['iter_num'] in (8, 16, 24, 32)
    train(tmp_path, data_dir, *common, '--init_from=resume', f'--out_dir={out}')
    straight, resumed = steps_of(tmp_path / 'straight'), steps_of(out)
    assert sorted(resumed) == list(range(40))
    for it in range(40):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5), it


@pytest.mark.parametrize('args, needle', [
    (['--out_dir=/proc/forbidden'], "out_dir='/proc/forbidden' is not writable"),
    (['--moe_every=5'], 'moe_every=5 with n_layer=2 makes no MoE layer'),
    (['--router=remoe', '--z_loss_coef=0.1'], "z_loss_coef=0.1 has no effect with router='remoe': remove it"),
    (['--remoe_alpha=1.5'], "remoe_alpha=1.5 has no effect with router='topk'"),
    (['--moe_every=0', '--n_expert=16'], 'n_expert=16 has no effect in a dense model'),
    (['--rmoe_dim=16'], 'rmoe_dim=16 has no effect without recurrent_router=True'),
    (['--data_files=a.txt'], "data_files='a.txt' has no effect with dataset='shakespeare_char'"),
    (['--dtype=float16'], "dtype='float16' needs a CUDA GPU"),
    (['--max_skipped_steps=-1'], 'max_skipped_steps=-1 must be >= 0'),
    (['--balance=bias', '--aux_loss_coef=0.02'], "aux_loss_coef=0.02 has no effect with balance='bias'"),
    (['--bias_update_rate=0.01'], "bias_update_rate=0.01 has no effect with balance='aux'"),
    (['--router=remoe', '--balance=bias'], "balance='bias' with router='remoe' is invalid"),
    (['--balance=loss'], "balance='loss' is not one of aux, bias, none"),
    (['--n_shared_expert=-1'], 'n_shared_expert=-1 must be >= 0'),
    (['--device=mps'], "device='mps' is not cpu, cuda or cuda:N"),
    (['--beta2=1.5'], 'beta2=1.5 must be in [0, 1)'),
    (['--grad_clip=-1'], 'grad_clip=-1.0 must be >= 0 (0 = no clipping)'),
    (['--weight_decay=-0.1'], 'weight_decay=-0.1 must be >= 0'),
    (['--min_lr=1.0'], 'min_lr=1.0 must be between 0 and learning_rate=0.002'),
    (['--warmup_iters=-3'], 'warmup_iters=-3 must be >= 0'),
    (['--learning_rate=-1'], 'learning_rate=-1.0 must be > 0'),
    (['--router=remoe', '--remoe_alpha=1.0'], 'remoe_alpha=1.0 must be > 1'),
    (['--seed=-1'], 'seed=-1 must be >= 0'),
    (['--rope_theta=0'], 'rope_theta=0.0 must be > 0'),
    (['exp/remoe.py'], "no config 'exp/remoe.py'; the configs are: cosine, deepseek, dense, "),
])
def test_bad_input_found_before_any_work(tmp_path, args, needle):
    """One line, exit code 2, before any data is prepared (this data_dir stays empty)."""
    proc = train(tmp_path, tmp_path / 'data', *args, ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], \
        proc.stderr
    assert not (tmp_path / 'data').exists()


@pytest.mark.parametrize('where', ['data_dir', 'out_dir'])
def test_a_folder_that_cannot_be_made_is_one_line(tmp_path, where):
    """A path under a file cannot be created (root may write anywhere else)."""
    (tmp_path / 'afile').write_text('x')
    folder = {'data_dir': tmp_path / 'data', 'out_dir': tmp_path / 'out', where: tmp_path / 'afile' / 'sub'}
    proc = run('train.py', *TINY, '--max_iters=0', f"--data_dir={folder['data_dir']}", f"--out_dir={folder['out_dir']}",
               cwd=tmp_path, ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'error: {where}='), proc.stderr


@pytest.mark.parametrize('arg, neighbour', [('--learning_rate=-1', 'max_iters'), ('--rope_theta=0', 'hf_max_tokens'),
                                            ('--warmup_iters=-1', 'lr_decay_iters')])
def test_a_bad_value_error_names_that_key_alone(tmp_path, arg, neighbour):
    """Each key is checked on its own: the line once said "max_iters=3 must be >= 0 and learning_rate=-1.0 > 0"."""
    proc = train(tmp_path, tmp_path / 'data', arg, ok=False)
    assert proc.returncode == 2 and arg[2:].split('=')[0] in proc.stderr and neighbour not in proc.stderr, proc.stderr


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, data_dir):
    out = tmp_path / 'out'
    train(tmp_path, data_dir, '--max_iters=2', f'--out_dir={out}')
    before = (out / 'ckpt.pt').read_bytes()
    proc = train(tmp_path, data_dir, '--max_iters=2', f'--out_dir={out}', ok=False)
    assert proc.returncode == 2 and 'holds an earlier run' in proc.stderr and '--init_from=resume' in proc.stderr
    assert (out / 'ckpt.pt').read_bytes() == before and (out / 'log.jsonl').exists()
