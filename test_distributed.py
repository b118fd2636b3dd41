"""
Tests for distributed.py on CPU: 2 gloo processes started from pytest.

- The expert-parallel layer equals the single-process Experts: output and the gradients of x,
  gates and weights, for degenerate routings as well as random ones.
- DDP + EP training steps of a tiny ReMoE GPT equal one process on the same global batch, with λ
  equal on both ranks; the gathered checkpoint state equals the single-process state_dict.
- The real entry point: torchrun with 2 processes and --ep_size=2 gives the losses of 1 process,
  its checkpoint samples in 1 process and resumes with another ep_size; bad ep_size is one line.

Shape legend: N tokens per rank, E experts, D width, H expert hidden.
"""

import copy
import socket
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import distributed
from evaluate import score_split
from experts import Experts
from model import GPT, ROUTERS, GPTConfig
from conftest import TINY, read_log, router_config, run

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    """Run fn(rank, *args) in WORLD gloo processes; an exception in any of them fails the test."""
    mp.spawn(_worker, args=(fn, free_port(), args), nprocs=WORLD, join=True)


def _worker(rank, fn, port, args):
    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def ep_dist(rank, ep_size=WORLD):
    """A Dist with the EP groups, as distributed.init builds them after torchrun's process group."""
    d = distributed.Dist(rank=rank, world_size=WORLD, ep_size=ep_size)
    d.ep_group = dist.new_group(list(range(WORLD)))
    d.expert_dp_group = None
    return d

# -----------------------------------------------------------------------------
# the layer


def routings(N, E, gen):
    """name -> gates [WORLD * N, E], the global batch; rank r takes rows r*N:(r+1)*N.
    With E=4 on 2 ranks, rank 0 owns experts 0-1 and rank 1 owns 2-3."""
    u = lambda: 0.1 + torch.rand(WORLD * N, E, generator=gen)
    topk = torch.zeros(WORLD * N, E).scatter(1, torch.rand(WORLD * N, E, generator=gen).topk(2).indices, 1)
    relu = (torch.rand(WORLD * N, E, generator=gen) < 0.4).float()  # 0..E experts per token
    one = torch.zeros(WORLD * N, E)
    one[:, 2] = 1
    idle_rank = torch.zeros(WORLD * N, E)
    idle_rank[:, :2] = 1  # every token on rank 0's experts: rank 1 receives nothing
    quiet_rank = relu.clone()
    quiet_rank[N:] = 0  # rank 1's tokens use no expert at all: it sends nothing
    no_expert = topk.clone()
    no_expert[:, 1] = 0  # expert 1 gets no tokens
    return {name: u() * mask for name, mask in dict(
        topk=topk, relu_variable_k=relu, all_on_one_expert=one, rank_receives_nothing=idle_rank,
        rank_sends_nothing=quiet_rank, expert_without_tokens=no_expert,
        all_gates_zero=torch.zeros(WORLD * N, E)).items()}


def _layer_matches(rank, impl):
    N, E, D, H = 6, 4, 8, 12
    gen = torch.Generator().manual_seed(0)  # the same on both ranks: the global problem
    full = Experts(E, D, H, impl)
    with torch.no_grad():
        full.w_in.normal_(generator=gen), full.w_out.normal_(generator=gen)
    d = ep_dist(rank)
    ep = distributed.ExpertParallelExperts(full, d)
    mine = slice(rank * N, (rank + 1) * N)
    for name, gates in routings(N, E, gen).items():
        x = torch.randn(WORLD * N, D, generator=gen, requires_grad=True)
        gates.requires_grad_(True)
        dy = torch.randn(WORLD * N, D, generator=gen)
        # single process: the whole global batch through the full layer
        full.zero_grad()
        y_ref = full(x, gates)
        (y_ref * dy).sum().backward()
        # this rank: its rows only, through the all-to-all
        ep.zero_grad()
        x_r, g_r = x.detach()[mine].requires_grad_(), gates.detach()[mine].requires_grad_()
        y = ep(x_r, g_r)
        (y * dy[mine]).sum().backward()
        lo = rank * (E // WORLD)
        tol = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, y_ref[mine], **tol, msg=f'{name}: y')
        torch.testing.assert_close(x_r.grad, x.grad[mine], **tol, msg=f'{name}: dx')
        torch.testing.assert_close(g_r.grad, gates.grad[mine], **tol, msg=f'{name}: dgates')
        # the owner's weight gradient sums both ranks' tokens, as the single process does
        torch.testing.assert_close(ep.w_in.grad, full.w_in.grad[lo:lo + E // WORLD], **tol, msg=f'{name}: dw_in')
        torch.testing.assert_close(ep.w_out.grad, full.w_out.grad[lo:lo + E // WORLD], **tol, msg=f'{name}: dw_out')
        if name == 'all_gates_zero':
            assert not y.any() and not x_r.grad.any()


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
def test_expert_parallel_layer_equals_single_process(impl):
    spawn(_layer_matches, impl)

# -----------------------------------------------------------------------------
# DDP + EP training steps of a whole model, in process


def _training_matches(rank, router, extra):
    torch.manual_seed(0)
    config = GPTConfig(**router_config(router, n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4, top_k=2,
                                       block_size=8, vocab_size=64, expert_impl='grouped', remoe_lambda0=1e-3, **extra))
    reference = GPT(config)  # the same init on both ranks (same seed)
    model = copy.deepcopy(reference)
    if rank > 0:  # another init elsewhere: apply_expert_parallel must take rank 0's experts
        with torch.no_grad():
            for block in model.transformer.h:
                block.mlp.experts.w_in.normal_()
    d = ep_dist(rank, WORLD if ROUTERS[router].expert_parallel else 1)  # (Lory: DDP alone)
    distributed.apply_expert_parallel(model, d)
    ddp = distributed.wrap(model, d)
    make_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    opt, ref_opt = make_opt(model), make_opt(reference)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        idx = torch.randint(0, 64, (WORLD * 2, 8), generator=gen)  # global batch: 2 rows per rank
        mine = idx[rank * 2:(rank + 1) * 2]
        _, loss, info = ddp(mine, mine)
        loss.backward()
        distributed.sync_expert_grads(model, d)
        distributed.clip_grad_norm_(model, 0.5, d)
        opt.step(), opt.zero_grad()
        dense = ('expert_sum' in info) and tuple(distributed.all_reduce_sum(info[k], d)  # Default MoE: pooled
                                                 for k in ('expert_sum', 'expert_count'))
        model.update_routers(distributed.all_reduce_mean(info['load'].float(), d), *(dense or ()))
        # one process, the same global batch as 2 micro-batches (mean of the per-rank losses)
        ref_losses, ref_load, ref_sum, ref_count = [], 0, 0, 0
        for r in range(WORLD):
            rows = idx[r * 2:(r + 1) * 2]
            _, ref_loss, ref_info = reference(rows, rows)
            (ref_loss / WORLD).backward()
            ref_losses.append(ref_loss.detach())
            ref_load += ref_info['load'].float() / WORLD
            if dense:
                ref_sum, ref_count = ref_sum + ref_info['expert_sum'], ref_count + ref_info['expert_count']
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_opt.step(), ref_opt.zero_grad()
        reference.update_routers(ref_load, *((ref_sum, ref_count) if dense else ()))
        torch.testing.assert_close(loss.detach(), ref_losses[rank], rtol=1e-5, atol=1e-6, msg=f'step {step}')
    lams = [torch.zeros(()) for _ in range(WORLD)]
    if router == 'remoe':
        dist.all_gather(lams, torch.tensor(model.router_lambda()))
        assert lams[0] == lams[1] == reference.router_lambda()
    if config.balance == 'bias':  # every rank took the same steps, from the global load
        bias = torch.stack([r.bias for r in model.routers()])
        assert bias.abs().sum() > 0
        biases = [torch.zeros_like(bias) for _ in range(WORLD)]
        dist.all_gather(biases, bias)
        assert torch.equal(biases[0], biases[1])
        torch.testing.assert_close(bias, torch.stack([r.bias for r in reference.routers()]))
    if config.dense_grad:  # the EMA: every rank's tokens, the same on every rank, the single process's
        ema = torch.stack([r.expert_ema for r in model.routers()])
        emas = [torch.zeros_like(ema) for _ in range(WORLD)]
        dist.all_gather(emas, ema)
        assert ema.abs().sum() > 0 and torch.equal(emas[0], emas[1])
        torch.testing.assert_close(ema, torch.stack([r.expert_ema for r in reference.routers()]), rtol=1e-4, atol=1e-6)
    # the gathered checkpoint is the single-process model, key for key
    full = distributed.full_state_dict(model, d)
    ref_sd = reference.state_dict()
    assert full.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(full[k], ref_sd[k], rtol=1e-4, atol=1e-5, msg=k)
    # optimizer state round trip: gathered, it is the single process's state; sliced back, this rank's
    full_opt = distributed.full_optimizer_state(opt, model, d)
    ref_state = ref_opt.state_dict()['state']
    for i, s in full_opt['state'].items():
        for key in ('exp_avg', 'exp_avg_sq'):
            torch.testing.assert_close(s[key], ref_state[i][key], rtol=1e-3, atol=1e-6, msg=f'{i} {key}')
    mine = opt.state_dict()['state']
    sharded = distributed.shard_optimizer_state(full_opt, opt, model, d)
    for i, p in enumerate(model.parameters()):
        for key in ('exp_avg', 'exp_avg_sq'):
            assert sharded['state'][i][key].shape == p.shape and torch.equal(sharded['state'][i][key], mine[i][key])


@pytest.mark.parametrize('router, extra', [('remoe', {}), ('topk', {}),
                                           ('topk', dict(balance='bias', bias_update_rate=0.05, n_shared_expert=1)),
                                           ('topk', dict(dense_grad=True, score='sigmoid', router_renorm=True,
                                                         balance='bias', seq_aux_coef=0.01))]
                         + [(name, {}) for name, cls in ROUTERS.items()  # every other batch-independent router
                            if name not in ('topk', 'remoe') and cls.batch_independent])
def test_ddp_with_expert_parallel_trains_like_one_process(router, extra):
    spawn(_training_matches, router, extra)

# -----------------------------------------------------------------------------
# the real entry point under torchrun

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={WORLD}']
COMMON = ['config/remoe.py', *TINY, '--max_iters=4', '--log_interval=1', '--eval_interval=4',
          '--warmup_iters=1', '--expert_impl=grouped']


def test_torchrun_ep_matches_one_process_and_checkpoint_samples(tmp_path, data_dir):
    env = {'OMP_NUM_THREADS': '1'}
    run('train.py', *COMMON, f'--data_dir={data_dir}', '--batch_size=2', '--ep_size=2',
        f'--out_dir={tmp_path}/ep', cwd=tmp_path, env=env, launcher=TORCHRUN)
    run('train.py', *COMMON, f'--data_dir={data_dir}', '--batch_size=4', f'--out_dir={tmp_path}/one',
        cwd=tmp_path, env=env)
    two = [r for r in read_log(tmp_path / 'ep') if 'loss' in r]
    one = [r for r in read_log(tmp_path / 'one') if 'loss' in r]
    assert [r['iter'] for r in two] == [0, 1, 2, 3]
    assert [r['loss'] for r in two] == pytest.approx([r['loss'] for r in one], rel=1e-4)
    assert [r['lambda'] for r in two] == pytest.approx([r['lambda'] for r in one], rel=1e-6)
    assert [r['sparsity'] for r in two] == pytest.approx([r['sparsity'] for r in one], abs=1e-5)
    assert all(r['a2a_mb'] > 0 for r in two)
    ckpt = torch.load(tmp_path / 'ep' / 'ckpt.pt', weights_only=True)
    ref = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)
    assert {k: v.shape for k, v in ckpt['model'].items()} == {k: v.shape for k, v in ref['model'].items()}
    proc = run('sample.py', f'--out_dir={tmp_path}/ep', '--start=ROMEO:', '--num_samples=1',
               '--max_new_tokens=8', cwd=tmp_path)
    assert proc.stdout.startswith('ROMEO:')
    # resume the 2-process EP checkpoint in one process (ep_size 1), and go on training
    run('train.py', *COMMON[:-4], '--max_iters=6', '--log_interval=1', '--eval_interval=6',
        f'--data_dir={data_dir}', '--batch_size=4', '--init_from=resume', f'--out_dir={tmp_path}/ep',
        cwd=tmp_path, env=env)
    assert torch.load(tmp_path / 'ep' / 'ckpt.pt', weights_only=True)['iter_num'] == 6


@pytest.mark.parametrize('args, needle', [(['--ep_size=3'], 'ep_size=3'),
                                          (['--ep_size=2', '--compile=True'], 'compile')])
def test_bad_ep_size_is_one_line_on_rank_0(tmp_path, data_dir, args, needle):
    proc = run('train.py', *TINY, f'--data_dir={data_dir}', *args, f'--out_dir={tmp_path}/o',
               cwd=tmp_path, ok=False, launcher=TORCHRUN)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_dead_rank_makes_the_other_exit_with_one_line(tmp_path, data_dir):
    """Two processes started by hand (torchrun's agent would kill the survivor itself): kill rank 1
    mid-training; rank 0 must stop within dist_timeout with a one-line message, not hang."""
    import os
    import signal
    import subprocess
    import time
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port()),
           'WORLD_SIZE': str(WORLD)}
    args = [sys.executable, str(Path(distributed.__file__).parent / 'train.py'), *COMMON, '--max_iters=100000',
            '--eval_interval=100000', '--batch_size=2', '--ep_size=2', '--dist_timeout=20',
            f'--data_dir={data_dir}', f'--out_dir={tmp_path}/o']
    procs = [subprocess.Popen(args, cwd=tmp_path, env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(WORLD)]
    try:
        for line in procs[0].stdout:  # rank 0 logs; wait until training runs
            if line.startswith('iter 2:'):
                break
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=60)
        assert time.time() - t0 < 30
        assert procs[0].returncode == 3
        lines = [line for line in err.splitlines() if line.startswith('error: ')]
        assert len(lines) == 1 and 'another process stopped' in lines[0], err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# -----------------------------------------------------------------------------
# the final score, pooled

def _tiny_scorer():
    torch.manual_seed(0)  # the same weights in every process
    return GPT(GPTConfig(block_size=8, vocab_size=256, n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4,
                         top_k=2, expert_impl='loop'))


def _score_pools(rank, folder, expected):
    d = distributed.Dist(rank=rank, world_size=WORLD)
    got = score_split(_tiny_scorer(), data.Batches(folder, 3, 8, rank, WORLD), nullcontext(), d, rows=3)
    assert got['val_tokens'] == expected['val_tokens']  # every token once, over both ranks
    assert got['val'] == pytest.approx(expected['val'], rel=1e-6), (got, expected)


def test_the_final_score_pools_sums_and_counts_over_processes(tmp_path):
    """Each rank scores its share of the windows (rank 1's include the short tail window, so the
    ranks' token counts differ) and the pooled loss equals one process scoring them all."""
    (tmp_path / 'a.txt').write_text('To be, or not to be, that is the question. ' * 40)
    data.prepare('textfiles', str(tmp_path / 'data'), files=str(tmp_path / 'a.txt'), tokenizer='bytes')
    folder = data.dataset_folder('textfiles', str(tmp_path / 'data'), tokenizer='bytes')
    expected = score_split(_tiny_scorer(), data.Batches(folder, 3, 8), nullcontext(), distributed.Dist(), rows=3)
    spawn(_score_pools, folder, expected)
