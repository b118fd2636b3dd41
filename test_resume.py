"""
Resume: the checkpoint's config is the run's config. `--init_from=resume --out_dir=X` alone
continues the run exactly; the command line may change how it goes on (configurator.RESUME_MAY_CHANGE)
and nothing else; what a checkpoint must hold for that (the float16 loss scale, the best weights).
"""
import signal

import pytest
import torch

import distributed
from checkpoint import STOP_CKPT, Saver, load_checkpoint, restore_training
from conftest import TINY, read_log, run, start, train, wait_for_step
from model import GPT, GPTConfig

REMOE = ['--router=remoe', '--router_lr_scale=0.5', '--remoe_lambda_floor=True', '--warmup_iters=2']


def steps_of(out_dir):
    """{iteration: loss} of the logged steps; a resumed run logs some twice, and the later wins."""
    return {r['iter']: r['loss'] for r in read_log(out_dir) if 'loss' in r}


def test_resume_with_only_out_dir_continues_the_run_exactly(tmp_path, data_dir):
    """ReMoE with router_lr_scale != 1 (other optimizer groups than the defaults'), stopped by
    SIGTERM, resumed with nothing but --init_from=resume --out_dir: the uninterrupted losses."""
    common = [*REMOE, '--max_iters=60', '--eval_interval=20', '--log_interval=1', '--block_size=256']
    train(tmp_path, data_dir, *common, f'--out_dir={tmp_path}/straight')
    out = tmp_path / 'stopped'
    proc = start(tmp_path, data_dir, *common, f'--out_dir={out}')
    wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM  # stopped while training, not finished
    stopped_at = load_checkpoint(out / 'ckpt.pt')['iter_num']
    assert 5 < stopped_at < 60
    resumed = run('train.py', '--init_from=resume', f'--out_dir={out}', cwd=tmp_path)
    assert f'resuming {out} at iteration {stopped_at}\n' in resumed.stdout
    straight, again = steps_of(tmp_path / 'straight'), steps_of(out)
    assert sorted(again) == list(range(60))
    for it in range(60):
        assert again[it] == pytest.approx(straight[it], rel=1e-5), it
    # the run record appended on resume describes the model that was trained: ReMoE, not the default
    runs = [r for r in read_log(out) if 'run' in r]
    assert len(runs) == 2 and runs[1]['run']['router'] == 'remoe' and runs[1]['run']['router_lr_scale'] == 0.5
    assert runs[1]['iter'] == stopped_at and runs[1]['resumed'] == {}


@pytest.fixture(scope='module')
def short_run(tmp_path_factory, data_dir):
    """A ReMoE run of 4 iterations whose checkpoint the refusals below must leave untouched."""
    tmp = tmp_path_factory.mktemp('short')
    train(tmp, data_dir, *REMOE, '--max_iters=4', '--eval_interval=4', f'--out_dir={tmp}/out')
    return tmp / 'out'


@pytest.mark.parametrize('arg, saved', [
    ('--n_expert=8', 'n_expert=4'),  # the model's shape
    ('--remoe_alpha=2.0', 'remoe_alpha=1.2'),  # a router knob
    ('--router=topk', "router='remoe'"),
    ('--router_lr_scale=1.0', 'router_lr_scale=0.5'),  # the optimizer's groups
    ('--weight_decay=0.0', 'weight_decay=0.1'),  # AdamW's saved state would overwrite it
    ('--batch_size=8', 'batch_size=4'),  # the data order
    ('--dataset=multidomain', "dataset='shakespeare_char'"),
    ('--seed=7', 'seed=1337'),
])
def test_a_change_resume_cannot_honour_is_a_one_line_error(tmp_path, short_run, arg, saved):
    before = (short_run / 'ckpt.pt').read_bytes(), (short_run / 'log.jsonl').read_text()
    proc = run('train.py', '--init_from=resume', f'--out_dir={short_run}', arg, cwd=tmp_path, ok=False)
    lines = proc.stderr.strip().splitlines()
    key = arg[2:].partition('=')[0]
    assert proc.returncode == 2 and len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert lines[0].startswith(f'error: {key}=') and f'was trained with {saved}' in lines[0]
    assert 'another --out_dir' in lines[0]
    assert ((short_run / 'ckpt.pt').read_bytes(), (short_run / 'log.jsonl').read_text()) == before


def test_an_allowed_change_takes_effect_and_is_logged(tmp_path, data_dir):
    out = tmp_path / 'out'
    train(tmp_path, data_dir, *REMOE, '--max_iters=4', '--eval_interval=4', '--log_interval=1', f'--out_dir={out}')
    # repeating the run's own values (as a config file would) is not a change
    proc = run('train.py', '--init_from=resume', f'--out_dir={out}', '--router=remoe', '--max_iters=8',
               '--eval_interval=2', cwd=tmp_path)
    assert f'resuming {out} at iteration 4, eval_interval 4 -> 2, max_iters 4 -> 8' in proc.stdout
    log = read_log(out)
    assert max(steps_of(out)) == 7 and load_checkpoint(out / 'ckpt.pt')['iter_num'] == 8  # trained further
    assert [r['iter'] for r in log if 'val_loss' in r] == [0, 4, 4, 6, 8]  # resume evaluates first; the new interval
    run_record = [r for r in log if 'run' in r][-1]
    assert run_record['resumed'] == {'eval_interval': [4, 2], 'max_iters': [4, 8]}
    assert run_record['run']['max_iters'] == 8 and load_checkpoint(out / 'ckpt.pt')['config']['max_iters'] == 8


def test_a_stop_keeps_the_best_checkpoint_and_resume_takes_the_stop(tmp_path, data_dir):
    """always_save_checkpoint=False: ckpt.pt holds the best weights, so a stop writes ckpt-stop.pt
    beside it and resume continues from there; the next ckpt.pt supersedes (and removes) it."""
    out = tmp_path / 'out'
    args = ['--always_save_checkpoint=False', '--max_iters=300', '--eval_interval=4', '--log_interval=1',
            '--block_size=256', '--warmup_iters=2']
    proc = start(tmp_path, data_dir, *args, f'--out_dir={out}')
    wait_for_step(out, 9, proc)  # past two evaluations
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    best, stop = load_checkpoint(out / 'ckpt.pt'), load_checkpoint(out / STOP_CKPT)
    vals = {r['iter']: r['val_loss'] for r in read_log(out) if 'val_loss' in r}
    assert best['iter_num'] == min((it for it in vals if it > 0), key=vals.get)  # the best, untouched
    assert stop['iter_num'] > best['iter_num'] and stop['iter_num'] > max(vals)
    resumed = run('train.py', '--init_from=resume', f'--out_dir={out}', f'--max_iters={stop["iter_num"] + 1}',
                  '--eval_interval=1', cwd=tmp_path)
    assert f"resuming {out} at iteration {stop['iter_num']}," in resumed.stdout


def test_the_float16_loss_scale_survives_a_checkpoint(tmp_path):
    """A GradScaler's state (enabled on CPU here: float16 training itself needs CUDA) is saved
    and restored, so a float16 resume does not restart its loss scale."""
    d = distributed.Dist()
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16, ffn_hidden=16, n_expert=2,
                          top_k=1, expert_impl='loop'))
    optimizer = model.configure_optimizer(1e-3, 0.0, (0.9, 0.95))
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    scaler.update(2.0**7)  # a scale the run has learned
    gen = torch.Generator().manual_seed(0)
    Saver(str(tmp_path), model, optimizer, scaler, d, gen, keep_best=False).save(3, 1.0)
    fresh = torch.amp.GradScaler('cpu')
    restore_training(load_checkpoint(tmp_path / 'ckpt.pt'), model, optimizer, fresh, d, gen)
    assert fresh.get_scale() == 2.0**7 and fresh.state_dict() == scaler.state_dict()


def test_a_huge_step_is_announced_before_it_starts(tmp_path, data_dir):
    """block_size=100000 runs (users may mean it), but says first what one step will cost."""
    proc = start(tmp_path, data_dir, '--block_size=100000', '--batch_size=64', '--max_iters=1', f'--out_dir={tmp_path}/o')
    for line in proc.stdout:
        if 'one step:' in line:
            break
    proc.kill()
    proc.communicate()
    assert line.startswith('warning: one step: at least ') and 'GB of memory' in line, line
