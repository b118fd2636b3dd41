"""
End-to-end tests of the real entry points (train.py, sample.py) in subprocesses, on a tiny model
trained on the default data (Shakespeare as bytes), plus fullgraph compile against eager.
"""

import sys

import pytest
import torch

from conftest import TINY, read_log, run, run_in_process, train


def test_loss_goes_down_and_log_has_routing_stats(tmp_path, data_dir):
    proc = train(tmp_path, data_dir, '--max_iters=40', '--eval_interval=20', '--log_interval=5',
                 '--learning_rate=3e-3', '--warmup_iters=5', f'--out_dir={tmp_path}/out')
    assert 'tok/s, mfu ' in proc.stdout and ', load cv ' in proc.stdout  # the router's own part of the line
    log = read_log(tmp_path / 'out')
    steps = [r for r in log if 'loss' in r]
    evals = [r for r in log if 'val_loss' in r]
    assert steps[-1]['loss'] < steps[0]['loss'] - 1.0
    assert evals[-1]['val_loss'] < evals[0]['val_loss'] - 1.0
    assert [r['iter'] for r in evals] == [0, 20, 40]
    record = steps[-1]
    for key in ('iter', 'loss', 'lm_loss', 'aux_loss', 'lr', 'tokens_per_sec', 'mfu', 'load_cv', 'load_max',
                'active_experts', 'router_entropy'):
        assert key in record, key
    assert len(record['load_cv']) == 2 and record['active_experts'] == [2.0, 2.0]
    assert record['loss'] == pytest.approx(record['lm_loss'] + record['aux_loss'], rel=1e-4)
    assert (tmp_path / 'out' / 'ckpt.pt').exists()


def test_resume_continues_exactly(tmp_path, data_dir):
    """8 iterations in one go equal 4 + resume + 4: same data order, RNG and optimizer state."""
    common = ['--eval_interval=4', '--log_interval=1', '--warmup_iters=2', '--lr_decay_iters=8']
    train(tmp_path, data_dir, *common, '--max_iters=8', f'--out_dir={tmp_path}/straight')
    train(tmp_path, data_dir, *common, '--max_iters=4', f'--out_dir={tmp_path}/resumed')
    ckpt = torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 4
    train(tmp_path, data_dir, *common, '--max_iters=8', '--init_from=resume', f'--out_dir={tmp_path}/resumed')
    straight = {r['iter']: r['loss'] for r in read_log(tmp_path / 'straight') if 'loss' in r}
    resumed = {r['iter']: r['loss'] for r in read_log(tmp_path / 'resumed') if 'loss' in r}
    assert sorted(resumed) == list(range(8))
    for it in range(8):
        assert resumed[it] == pytest.approx(straight[it], rel=1e-5), it
    assert torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)['iter_num'] == 8


def test_sample_prints_text(tmp_path, data_dir):
    train(tmp_path, data_dir, '--max_iters=2', f'--out_dir={tmp_path}/out')
    (tmp_path / 'prompt.txt').write_text('ROMEO:\n')
    proc = run('sample.py', f'--out_dir={tmp_path}/out', '--start=FILE:prompt.txt', '--num_samples=2',
               '--max_new_tokens=12', '--seed=3', cwd=tmp_path)
    assert proc.stdout.count('ROMEO:') == 2 and len(proc.stdout) > 40
    again = run('sample.py', f'--out_dir={tmp_path}/out', '--start=FILE:prompt.txt', '--num_samples=2',
                '--max_new_tokens=12', '--seed=3', cwd=tmp_path)
    assert again.stdout == proc.stdout  # --seed makes sampling repeatable


def test_config_file_spellings_and_torchrun(tmp_path, data_dir):
    quick = ['--max_iters=0', '--n_layer=1', '--eval_iters=1']
    for i, spelling in enumerate(('configs/topk.py', 'config/topk.py', 'topk')):
        train(tmp_path, data_dir, spelling, *quick, f'--out_dir={tmp_path}/o{i}')
        run_config = read_log(tmp_path / f'o{i}')[0]['run']
        # the file was read: its ffn_hidden=256 replaced TINY's 32, given before it on the command line
        assert run_config['ffn_hidden'] == 256 and run_config['n_layer'] == 1  # and the override after it won
    train(tmp_path, data_dir, '--max_iters=2', f'--out_dir={tmp_path}/tr',
          launcher=[sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1'])
    assert (tmp_path / 'tr' / 'ckpt.pt').exists()


@pytest.mark.parametrize('args, needle', [
    (['--top_k=9', '--n_expert=8'], 'top_k=9'),
    (['--router=softmax'], "router='softmax'"),
    (['--expert_impl=fast'], "expert_impl='fast'"),
    (['--expert_impl=loop', '--compile=True'], "expert_impl='loop'"),
    (['--n_embd=30', '--n_head=4'], 'n_embd=30'),
    (['--batch_size=two'], 'batch_size'),
    (['--no_such_knob=1'], 'no_such_knob'),
    (['config/nonexistent.py'], 'topk'),  # the error lists the configs that exist
    (['--init_from=resume'], 'no checkpoint'),
    (['--dataset=textfiles', '--data_files=/nonexistent/*.txt'], 'nonexistent'),
])
def test_bad_input_is_a_one_line_error(tmp_path, data_dir, args, needle):
    proc = train(tmp_path, data_dir, *args, f'--out_dir={tmp_path}/out', ok=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], proc.stderr


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, data_dir):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'ckpt.pt').write_bytes(b'not a checkpoint')
    for proc in (train(tmp_path, data_dir, '--init_from=resume', f'--out_dir={tmp_path}/out', ok=False),
                 run('sample.py', f'--out_dir={tmp_path}/out', cwd=tmp_path, ok=False)):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and 'not a readable checkpoint' in lines[0], proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a CUDA GPU')
def test_sample_on_a_device_this_machine_lacks_says_so(tmp_path):
    """It once said the checkpoint was unreadable: the device is checked before the checkpoint is read."""
    proc = run('sample.py', f'--out_dir={tmp_path}/none', '--device=cuda', cwd=tmp_path, ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--device='cuda' is not usable" in lines[0], proc.stderr


def test_vocabulary_and_tokenizer_follow_the_dataset(tmp_path, data_dir):
    """bytes: a 256-entry vocabulary from meta.json, saved with the tokenizer, and sample.py decodes
    bytes; a checkpoint does not resume on another dataset."""
    train(tmp_path, data_dir, '--max_iters=2', f'--out_dir={tmp_path}/out')
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['vocab_size'] == 256 and ckpt['tokenizer'] == 'bytes'
    assert ckpt['model']['lm_head.weight'].shape[0] == 256
    header = read_log(tmp_path / 'out')[0]['run']
    assert header['tokenizer'] == 'bytes' and header['vocab_size'] == 256 and header['tokens_per_iter'] == 4 * 32
    proc = run('sample.py', f'--out_dir={tmp_path}/out', '--start=Hamlet', '--max_new_tokens=30', cwd=tmp_path)
    assert proc.stdout.startswith('Hamlet') and len(proc.stdout.split('\n')[0]) >= 6
    proc = train(tmp_path, data_dir, '--init_from=resume', '--dataset=shakespeare', '--max_iters=3',
                 f'--out_dir={tmp_path}/out', ok=False)
    assert proc.returncode == 2 and "was trained with dataset='shakespeare_char'" in proc.stderr, proc.stderr


def test_val_loss_per_domain(tmp_path, monkeypatch):
    """multidomain: every evaluation logs a val loss per domain, beside the overall one. train.py
    runs in this process, so that a stand-in for Django's docs (otherwise a download) takes effect."""
    import tarfile

    import corpora
    archive = tmp_path / 'django.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:  # two fixed stand-in pages: the val split must not hang on
        for i in range(2):                        # the size of a file of the repo
            page = tmp_path / f'page{i}.txt'
            page.write_text(''.join(f"Section {i}.{j}\n============\n\nThe setting number {j} does this.\n\n"
                                    for j in range(400)))
            tar.add(page, arcname=f'django-5.2.19/docs/page{i}.txt')
    monkeypatch.setattr(corpora, 'django_archive', lambda download_dir: str(archive))
    monkeypatch.setattr(corpora, 'DOMAIN_BYTES', 60_000)
    monkeypatch.chdir(tmp_path)
    assert run_in_process(monkeypatch, [*TINY, '--dataset=multidomain', f'--data_dir={tmp_path}/data',
                                        '--max_iters=4', '--eval_interval=2', '--eval_iters=50',
                                        f'--out_dir={tmp_path}/out']) == 0
    evals = [r for r in read_log(tmp_path / 'out') if 'val_loss' in r]
    assert [r['iter'] for r in evals] == [0, 2, 4]
    for r in evals:
        per_domain = r['val_loss_per_domain']
        assert list(per_domain) == ['drama', 'scripture', 'code', 'docs']
        # 200 windows: every domain is reached (scripture, the smallest, is 4 % of the val tokens)
        assert all(0 < loss < 10 for loss in per_domain.values())
        # the overall loss is the token-weighted mean of the domains' losses
        assert min(per_domain.values()) <= r['val_loss'] + 1e-4 and r['val_loss'] <= max(per_domain.values()) + 1e-4
    assert evals[-1]['val_loss_per_domain']['code'] < evals[0]['val_loss_per_domain']['code']


def test_compiled_training_matches_eager(tmp_path, data_dir):
    """The real entry point with compile=True (fullgraph: a graph break would raise) gives the
    losses of the eager run."""
    common = ['--max_iters=3', '--log_interval=1', '--eval_interval=3']
    train(tmp_path, data_dir, *common, f'--out_dir={tmp_path}/eager')
    train(tmp_path, data_dir, *common, '--compile=True', f'--out_dir={tmp_path}/compiled')
    eager = [r['loss'] for r in read_log(tmp_path / 'eager') if 'loss' in r]
    compiled = [r['loss'] for r in read_log(tmp_path / 'compiled') if 'loss' in r]
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize('moe_every, router, recurrent, extra', [
    (0, 'topk', False, {}), (1, 'topk', False, {}), (2, 'remoe', True, {}),
    (1, 'prototype', False, dict(balance='bias', bias_update_rate=0.05, n_shared_expert=1)),
    (1, 'topk', False, dict(capacity_factor=1.0)),
    (1, 'topk', True, dict(score='sigmoid', router_renorm=True, route_scale=2.5, balance='bias', bias_update_rate=0.05,
                           seq_aux_coef=0.01, dense_grad=True, dense_grad_beta=0.5))])
def test_compiled_training_matches_eager_in_process(moe_every, router, recurrent, extra):
    """fullgraph compile of the dense model, an MoE model, a recurrent ReMoE with dense layers
    between its MoE layers, a bias-balanced prototype router with a shared expert, top-k with token
    dropping (once compiled to an MoE output of 0: see Router.drop_overflow) and a recurrent DeepSeek-V3
    router (sigmoid, bias, sequence-wise loss) with Default MoE's dense gradient: same losses and
    gradients as eager over several optimizer steps, with λ / the bias / the EMA updated between
    them, and no recompilation."""
    import copy

    from model import GPT, GPTConfig
    torch._dynamo.reset()  # forget the graphs other tests compiled for GPT.forward
    torch.manual_seed(0)
    config = GPTConfig(n_layer=3, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4, top_k=2, router=router,
                       recurrent_router=recurrent, rmoe_dim=8, moe_every=moe_every, block_size=8, vocab_size=64,
                       **extra)
    eager = GPT(config)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    # SGD, not Adam: Adam turns rounding-level gradient differences into full-size steps
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, compiled_model)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            idx = torch.randint(0, 64, (2, 8))
            for model, fn, opt in ((eager, eager, opts[0]), (compiled_model, compiled, opts[1])):
                _, loss, info = fn(idx, idx)
                assert loss.grad_fn is not None, step  # the compiled loss (dense too) can be trained
                loss.backward()
                opt.step()
                opt.zero_grad()
                if 'load' in info:
                    model.update_routers(info['load'], info.get('expert_sum'), info.get('expert_count'))
                if model is eager:
                    eager_loss = loss.detach()
                else:
                    assert torch.allclose(loss.detach(), eager_loss, atol=1e-5, rtol=1e-5), step
    for p, cp in zip(eager.parameters(), compiled_model.parameters()):
        assert torch.allclose(p, cp, atol=1e-5, rtol=1e-4)
    router_state = lambda m: [b for name, b in m.named_buffers() if '.router.' in name]  # λ, the bias, the EMA
    per_layer = ('balance' in extra) + ('dense_grad' in extra) + (router == 'remoe')
    assert len(router_state(eager)) == config.n_moe_layers() * per_layer
    for b, cb in zip(router_state(eager), router_state(compiled_model)):
        if b.dim() == 2:  # the EMA [E, D] averages outputs that compile rounds differently
            torch.testing.assert_close(b, cb, rtol=1e-4, atol=1e-7)
        else:  # λ and the bias move by whole steps: exactly equal
            assert torch.equal(b, cb)


def test_fused_adamw_trains_as_the_foreach_one():
    """configure_optimizer takes torch's fused AdamW on the CPU too (one kernel over every parameter
    instead of a dozen foreach passes): a top-k model's losses and weights over 20 steps match the
    foreach optimizer's within float rounding, ReMoE's λ moving alike."""
    from model import GPT, GPTConfig
    results = []
    for fused in (None, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, ffn_hidden=32, n_expert=4, top_k=2, router='remoe',
                              block_size=16, vocab_size=64))
        opt = model.configure_optimizer(3e-3, 0.1, (0.9, 0.95), fused=fused, router_lr_scale=0.25)
        assert opt.defaults['fused'] is (fused is None)  # the default is the fused one on a CPU
        gen, losses = torch.Generator().manual_seed(1), []
        for _ in range(20):
            idx = torch.randint(0, 64, (4, 16), generator=gen)
            _, loss, info = model(idx, idx.roll(-1, 1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_routers(info['load'])
            losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in model.parameters()], model.router_lambda()))
    (fused_losses, fused_params, fused_lam), (losses, params, lam) = results
    assert fused_losses == pytest.approx(losses, rel=1e-5) and fused_lam == lam
    for p, q in zip(fused_params, params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
