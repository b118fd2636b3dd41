"""
Speed benchmarks: the MoE layer against a dense SwiGLU FFN with the same active FLOPs, and end-to-end
training of every config against configs/dense.py. Prints one table of ratios (moe / dense).

    python bench.py                  # everything: the layer grid, then every config, eager and compiled
    python bench.py --quick          # a one-minute subset for a 2-core CPU
    python bench.py --T=4096 --D=256 --Ek=8,2 --e2e=topk   # any slice of the grid
    python bench.py --T=512,4096 --Ek=8,2 --e2e=none --peer  # + the transformers Mixtral block
    python bench.py --T=none --e2e=none --ckpts=out-dense,out-topk,out-remoe   # trained models' steps
    python bench.py --sample         # sampling tokens/s with and without the KV cache, eager and compiled
    python bench.py --sample --ckpts=out-remoe --new_tokens=1000    # ... of trained checkpoints

(a) Layer: x [N, D] -> top-k router -> experts, for each backend, eager and compiled (fullgraph),
    forward and forward+backward, against the dense FFN in the same mode. Iso-FLOP convention:
    the dense hidden is 4D, each expert's hidden is 4D/K, so K experts cost one dense FFN.
    Variants are timed interleaved, rep by rep, in one process, and the median is reported.
    Memory: on CUDA the peak allocated during forward+backward; on CPU the bytes saved for backward
    (autograd's saved tensors, weights included), which is what a training step has to hold.
(b) Training: train.py in a subprocess with few iterations; tokens/s and MFU (active FLOPs) are the
    median of the logged iterations after the first two (which include compilation).
(c) --ckpts: training steps of trained models, which a few iterations from scratch are not (ReMoE
    only reaches its target sparsity, stage III, after hundreds of steps): each checkpoint's model,
    compiled, on batches of its own dataset, with its routers' updates (lambda, bias) running, timed
    step by step interleaved in one process; ratios against the first checkpoint.
(d) --sample (on its own): sample.generate's tokens/s for one sample of --new_tokens tokens from a one-token
    prompt (sample.py's defaults: temperature 0.8, top-k 200), with the KV cache and without it (the
    whole context every step), interleaved rep by rep in one process, medians; in each of --modes
    (eager, and compiled as sample.py --compile), each against the eager uncached loop too. The CPU
    configs' shapes with random weights (and the *_182m ones on a GPU), or the checkpoints of --ckpts.

Legend: N tokens, E experts, K active, D model width, H hidden (dense: 4D, expert: 4D/K).
"""

import argparse
import copy
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from corpora import DataError
from data import dataset_folder, get_batch, get_tokenizer, load_split, resolve_tokenizer
from experts import Experts
from pairs import swiglu
from model import GPT, GPTConfig
from sample import generate

REPO = Path(__file__).resolve().parent


class MoELayer(nn.Module):
    """Top-k softmax router + experts: the MoE FFN of model.py without its aux loss and statistics."""

    def __init__(self, D, E, K, impl, uniform=False):
        super().__init__()
        self.K, self.uniform = K, uniform
        self.w_g = nn.Linear(D, E, bias=False)
        self.experts = Experts(E, D, 4 * D // K, impl)

    def forward(self, x):
        N, E = x.size(0), self.w_g.out_features
        probs = self.w_g(x).float().softmax(-1)                                  # [N, E]
        if self.uniform:  # forced-uniform routing: token n uses experts nK..nK+K-1 (mod E), equal load
            idx = (torch.arange(N, device=x.device)[:, None] * self.K + torch.arange(self.K, device=x.device)) % E
            top_p = probs.gather(1, idx)
        else:
            top_p, idx = probs.topk(self.K, dim=-1)                                # [N, K]
        gates = torch.zeros_like(probs).scatter(1, idx, top_p).to(x.dtype)       # [N, E]
        return self.experts(x, gates)


def import_mixtral():
    """transformers' Mixtral config and MoE block, imported beside this repo's kernels.py.

    transformers >= 5 imports the Hugging Face Hub's `kernels` package by that name when its
    layers load, and this repo's kernels.py, on sys.path ahead of site-packages whenever a script
    runs from the repo root (or the repo is on PYTHONPATH), shadows it: "cannot import name
    'CUDAProperties' from 'kernels'". So transformers is imported with the repo's folder off
    sys.path and our module out of sys.modules, and both are put back afterwards: experts.py keeps
    this repo's kernels, transformers keeps the names it took from the Hub's."""
    ours = sys.modules.pop('kernels', None)
    path = sys.path[:]
    sys.path[:] = [p for p in path if Path(p or '.').resolve() != REPO]
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    finally:
        sys.path[:] = path
        sys.modules.pop('kernels', None)
        if ours is not None:
            sys.modules['kernels'] = ours
    return MixtralConfig, MixtralSparseMoeBlock


class PeerLayer(nn.Module):
    """The transformers Mixtral block (router + SwiGLU experts) at the same shape, for --peer: its
    experts run as `impl` ('eager': transformers' per-expert loop, or 'grouped_mm')."""

    def __init__(self, D, E, K, impl):
        super().__init__()
        MixtralConfig, MixtralSparseMoeBlock = import_mixtral()
        config = MixtralConfig(hidden_size=D, intermediate_size=4 * D // K, num_local_experts=E,
                               num_experts_per_tok=K, router_jitter_noise=0.0,
                               **({} if impl == 'eager' else {'experts_implementation': impl}))
        self.block = MixtralSparseMoeBlock(config)
        for p in self.block.parameters():  # transformers leaves them to the model's init: uninitialised
            nn.init.normal_(p, std=0.02)

    def forward(self, x):
        return self.block(x.unsqueeze(0)).squeeze(0)


class DenseFFN(nn.Module):
    """model.MLP's SwiGLU: gate and up projections in one matmul, like the experts."""

    def __init__(self, D):
        super().__init__()
        self.c_fc = nn.Linear(D, 2 * 4 * D, bias=False)
        self.c_proj = nn.Linear(4 * D, D, bias=False)

    def forward(self, x):
        return self.c_proj(swiglu(self.c_fc(x)))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def saved_bytes(fn, x):
    """Bytes autograd saves for backward during fn(x), each storage counted once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def peak_memory(fn, x, device):
    """MB: CUDA peak allocation of a forward+backward above what was already allocated;
    on CPU the tensors saved for backward."""
    if device.type != 'cuda':
        return saved_bytes(fn, x) / 2**20
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(x).float().sum().backward()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def time_interleaved(fns, reps, warmup=2):
    """{name: median seconds}: every rep runs each fn once, in turn, so slow drifts in the machine's
    load (other processes, clocks) hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_layer(N, D, E, K, backends, modes, args, device, dtype):
    """Rows of the table for one shape: every (backend, mode) against dense in the same mode."""
    torch.manual_seed(0)
    torch._dynamo.reset()  # fresh compile caches: every shape brings new modules of the same classes
    x = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(N, D, device=device, dtype=dtype)
    layers = {'dense': DenseFFN(D)}
    layers.update({b: MoELayer(D, E, K, b, args.uniform) for b in backends})
    if args.peer:
        layers.update({f'transformers {impl}': PeerLayer(D, E, K, impl) for impl in ('eager', 'grouped_mm')})
    fns, mems = {}, {}
    for name, layer in layers.items():
        layer.to(device=device, dtype=dtype)
        for mode in modes:
            if mode == 'compiled' and (name == 'loop' or name.startswith('transformers')):
                continue  # data-dependent shapes: loop is the eager reference; transformers' too
            f = torch.compile(layer, fullgraph=True, dynamic=False) if mode == 'compiled' else layer

            def fwd(f=f):
                with torch.no_grad():
                    f(x)
                sync(device)

            def fwd_bwd(f=f):
                f(x).backward(dy)
                sync(device)

            fns[name, mode, 'fwd'], fns[name, mode, 'fwd+bwd'] = fwd, fwd_bwd
            fwd_bwd()  # compile now, before any timing
            mems[name, mode] = peak_memory(f, x, device)
    t = time_interleaved(fns, args.reps)
    rows = []
    for (name, mode, what), sec in t.items():
        if name == 'dense':
            continue
        ref = t['dense', mode, what]
        mem = f"{mems[name, mode]:.0f} / {mems['dense', mode]:.0f}" if what == 'fwd+bwd' else ''
        rows.append((f'layer {what}', f'N{N} D{D} E{E} k{K}', name, mode,
                     f'{1e3 * sec:.1f} / {1e3 * ref:.1f} ms', sec / ref, mem))
    return rows


def train_run(config, compiled, args, device):
    """Median tokens/s and MFU of a short train.py run, skipping the first two logged iterations."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(REPO / 'train.py'), config, f'--out_dir={out}', f'--max_iters={args.iters}',
               '--log_interval=1', f'--eval_interval={10 * args.iters}', '--eval_iters=1', '--sample_tokens=0',
               f'--compile={compiled}', f'--data_dir={REPO / "data"}', f'--device={device.type}']
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        log = [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]
    steps = [r for r in log if 'tokens_per_sec' in r][2:]
    return statistics.median(r['tokens_per_sec'] for r in steps), statistics.median(r['mfu'] for r in steps)


def bench_train(configs, modes, args, device):
    """Each config against configs/dense.py, eager and compiled; a run that fails becomes a row saying so."""
    runs = {}
    for mode in modes:
        for name in ['dense', *configs]:
            try:
                runs[name, mode] = train_run(name, mode == 'compiled', args, device)
            except RuntimeError as e:
                print(e, file=sys.stderr)
    rows = []
    for name in ['dense', *configs]:
        for mode in modes:
            if (name, mode) not in runs or ('dense', mode) not in runs:
                rows.append(('train tok/s', name, 'auto', mode, 'failed (see stderr)', float('nan'), ''))
                continue
            (tps, mfu), (dense_tps, dense_mfu) = runs[name, mode], runs['dense', mode]
            # a time ratio like the layer rows: dense tokens/s over this config's tokens/s
            rows.append(('train tok/s', name, 'auto', mode, f'{tps:,.0f} / {dense_tps:,.0f}', dense_tps / tps,
                         f'mfu {100 * mfu:.1f}% / {100 * dense_mfu:.1f}%'))
        if (name, 'eager') in runs and (name, 'compiled') in runs:
            (eager, _), (compiled, _) = runs[name, 'eager'], runs[name, 'compiled']
            rows.append(('train compiled/eager', name, 'auto', '', f'{compiled:,.0f} / {eager:,.0f} tok/s',
                         eager / compiled, ''))
    return rows


def load_runs(paths, device):
    """{name: (checkpoint, train split)} for --ckpts, loaded up front so that a bad path fails before any timing."""
    runs = {}
    for path in paths:
        path = Path(path) / 'ckpt.pt' if Path(path).is_dir() else Path(path)
        ckpt = load_checkpoint(path, device)
        cfg = ckpt.get('config')
        if not cfg:
            raise CheckpointError(f"{path} holds no training config (not written by train.py): pass a train.py run")
        runs[path.parent.name] = ckpt, load_split(dataset_folder(cfg['dataset'], cfg['data_dir'],
                                                                 tokenizer=cfg.get('tokenizer', '')), 'train')
    return runs


def bench_checkpoints(runs, args, device):
    """(c): one row per checkpoint after the first, its compiled training step time against the first's,
    with the experts each token used on average (ReMoE's sparsity: K at its target)."""
    steps, active = {}, {}
    for name, (ckpt, data) in runs.items():
        cfg, gen = ckpt['config'], torch.Generator().manual_seed(0)
        batches = itertools.cycle([get_batch(data, cfg['batch_size'], cfg['block_size'], gen, device)
                                   for _ in range(8)])
        model = model_from_checkpoint(ckpt).to(device).train()
        optimizer = model.configure_optimizer(1e-4, 0.1, (0.9, 0.95))
        step_fn = torch.compile(model, fullgraph=True)
        per_token = []

        def step(model=model, optimizer=optimizer, step_fn=step_fn, batches=batches, per_token=per_token):
            _, loss, info = step_fn(*next(batches))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if 'load' in info:                                   # [L_moe, E]: what train.py feeds back
                model.update_routers(info['load'].float())
                per_token.append(info['load'].float().sum(-1).mean().item())
            sync(device)
        step()  # compile now, before any timing
        steps[name], active[name] = step, per_token
    t = time_interleaved(steps, args.reps, warmup=3)
    ref = next(iter(t))
    return [('train step', name, 'auto', 'compiled', f'{1e3 * sec:.1f} / {1e3 * t[ref]:.1f} ms', sec / t[ref],
             f'{statistics.mean(active[name]):.2f} experts/token' if active[name] else '')
            for name, sec in t.items() if name != ref]


def config_model(name):
    """The GPT of configs/<name>.py with random weights, its vocabulary that of the config's dataset."""
    scope = {}
    exec((REPO / 'configs' / f'{name}.py').read_text(), {}, scope)
    n_vocab = get_tokenizer(resolve_tokenizer(scope['dataset'], scope.get('tokenizer', ''))).n_vocab
    args = {f: scope[f] for f in GPTConfig.__dataclass_fields__ if f in scope}
    return GPT(GPTConfig(**args, vocab_size=64 * -(-n_vocab // 64)))


def sample_models(args, device):
    """{name: model} for --sample: the checkpoints of --ckpts, else every config's shape (the *_182m
    ones on a GPU only)."""
    torch.manual_seed(0)
    if args.ckpts:
        models = {}
        for path in args.ckpts.split(','):
            path = Path(path) / 'ckpt.pt' if Path(path).is_dir() else Path(path)
            models[path.parent.name] = model_from_checkpoint(load_checkpoint(path, device))
        return models
    names = [c.stem for c in sorted((REPO / 'configs').glob('*.py'))]
    if device.type != 'cuda':
        print(f"--sample: the *_182m shapes are skipped on a CPU (a GPU runs them): "
              f"{', '.join(n for n in names if n.endswith('_182m'))}", file=sys.stderr)
        names = [n for n in names if not n.endswith('_182m')]
    return {name: config_model(name) for name in names}


def bench_sampling(models, args, device, modes):
    """(d): rows of tokens/s with the KV cache and without it, for one sample of args.new_tokens, in
    each mode: eager, and compiled (model.compile(), as sample.py --compile; its compilation, timed
    on its own, is a first draw past block_size, which meets every graph: prompt, step, refill)."""
    rows = []
    for name, model in models.items():
        model.to(device).eval()
        idx = torch.zeros(1, 1, dtype=torch.long, device=device)  # one token, as sample.py's default '\n'
        eager_no_cache = None
        for mode in modes:
            torch._dynamo.reset()
            m = model
            if mode == 'compiled':
                torch._dynamo.config.capture_dynamic_output_shape_ops = True  # as sample.py --compile
                m = copy.deepcopy(model)
                m.compile()

            def draw(kv_cache, n=args.new_tokens, m=m):
                torch.manual_seed(0)
                generate(m, idx, n, temperature=0.8, top_k=200, kv_cache=kv_cache)
                sync(device)
            warm = {}
            for kv_cache in (True, False):  # warm-up (compiled: compilation)
                t0 = time.perf_counter()
                draw(kv_cache, model.config.block_size + 8)
                warm[kv_cache] = time.perf_counter() - t0
            t = time_interleaved({'cache': lambda: draw(True), 'no cache': lambda: draw(False)}, args.reps,
                                 warmup=0)
            new = args.new_tokens
            eager_no_cache = t['no cache'] if mode == 'eager' else eager_no_cache
            how = mode if mode == 'eager' else f'compiled ({warm[True]:.0f} / {warm[False]:.0f} s to compile)'
            rows.append(('sample tok/s', name, how, f'{new / t["cache"]:,.0f} / {new / t["no cache"]:,.0f}',
                         f'{eager_no_cache / t["cache"]:.2f}' if eager_no_cache else '-', t['no cache'] / t['cache'],
                         f'{1e3 * t["cache"] / new:.2f} / {1e3 * t["no cache"] / new:.2f} ms'))
            print(f'  done sampling {name}, {mode}', file=sys.stderr)
    return rows


HEADER = ('bench', 'shape / config', 'backend', 'mode', 'moe / dense', 'ratio', 'memory MB or MFU (moe / dense)')
SAMPLE_HEADER = ('bench', 'config', 'mode', 'cache / no cache tok/s', 'cache / eager no cache', 'speed-up',
                 'per token')


def print_table(rows, title, header=HEADER):
    table = [header] + [(*r[:5], f'{r[5]:.2f}', r[6]) for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    print(title)
    for i, r in enumerate(table):
        print('| ' + ' | '.join(str(c).ljust(w) for c, w in zip(r, widths)) + ' |')
        if i == 0:
            print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='a one-minute subset (2-core CPU)')
    p.add_argument('--T', default='512,4096', help="tokens per layer call, comma-separated; 'none' skips the layer")
    p.add_argument('--D', default='256,768')
    p.add_argument('--Ek', default='8,2;8,1;64,8', help='(E, K) pairs: "E,K;E,K"')
    p.add_argument('--backends', default='', help="default: loop,grouped (+ triton on CUDA)")
    p.add_argument('--modes', default='eager,compiled', help='eager, compiled or both (the layer rows and --sample)')
    p.add_argument('--reps', type=int, default=0, help='timed repetitions (default 10; --sample: 3)')
    p.add_argument('--uniform', action='store_true', help='forced-uniform routing (kernel speed without imbalance)')
    p.add_argument('--e2e', default='', help="configs to train against dense; default: the small ones; 'none' skips")
    p.add_argument('--iters', type=int, default=8, help='training iterations per end-to-end run')
    p.add_argument('--ckpts', default='', help="run folders or checkpoints: time their training steps against "
                                               "the first one's (compiled, interleaved)")
    p.add_argument('--peer', action='store_true',
                   help="add the transformers Mixtral block (its eager loop and grouped_mm) to the layer rows")
    p.add_argument('--sample', action='store_true',
                   help='only sampling: tokens/s with and without the KV cache (of --ckpts, else of every config)')
    p.add_argument('--new_tokens', type=int, default=500, help='--sample: tokens generated per repetition')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    args.reps = args.reps or (3 if args.sample else 10)
    if args.peer:
        try:
            import transformers  # noqa: F401
        except ImportError:
            sys.exit("error: --peer needs the transformers package (pip install transformers); it is optional")
    device = torch.device(args.device)
    if args.sample:
        try:
            models = sample_models(args, device)
        except (CheckpointError, DataError) as e:
            sys.exit(f'error: {e}')
        print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
              f"{torch.get_num_threads()} threads, fp32, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
        print(f'{args.new_tokens} new tokens from a one-token prompt, medians of {args.reps} interleaved draws')
        print_table(bench_sampling(models, args, device, args.modes.split(',')),
                    'speed-up = tokens/s with the KV cache / without it, in the same mode', SAMPLE_HEADER)
        return
    try:
        runs = load_runs(args.ckpts.split(','), device) if args.ckpts else {}
    except (CheckpointError, DataError) as e:
        sys.exit(f'error: {e}')
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    backends = ['loop', 'grouped'] + (['triton'] if device.type == 'cuda' else [])
    backends = args.backends.split(',') if args.backends else backends
    modes = args.modes.split(',')
    # the small configs that train against configs/dense.py (not the *_182m ones, which want a GPU)
    configs = [c.stem for c in sorted((REPO / 'configs').glob('*.py')) if c.stem != 'dense' and '_' not in c.stem]
    if args.e2e:
        configs = [] if args.e2e == 'none' else args.e2e.split(',')
    grid = [(int(T), int(D), *map(int, ek.split(','))) for T in args.T.split(',') for D in args.D.split(',')
            for ek in args.Ek.split(';')] if args.T != 'none' else []
    if args.quick:  # the shape of the CPU targets, eager only, and one short training comparison
        grid, modes, args.reps, configs, args.iters = [(512, 256, 8, 2)], ['eager'], 3, ['topk'], 4
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f"device: {name}, {dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
          f"{', forced-uniform routing' if args.uniform else ''}")
    rows = []
    for N, D, E, K in grid:
        rows += bench_layer(N, D, E, K, backends, modes, args, device, dtype)
        print(f'  done N{N} D{D} E{E} k{K}', file=sys.stderr)
    rows += bench_train(configs, modes, args, device) if configs else []
    rows += bench_checkpoints(runs, args, device) if runs else []
    print_table(rows, 'ratio = MoE time / dense time at equal active FLOPs (< 1: MoE faster); '
                      'dense hidden 4D, expert hidden 4D/k')


if __name__ == '__main__':
    main()
