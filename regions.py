"""
Where a compiled training step's time goes: each MoE config against configs/dense.py (equal active
FLOPs), region by region. bench.py says how fast; this file says why.

    python regions.py                              # topk against dense
    python regions.py --configs=topk,remoe --reps=60

Two measurements, each in one process, so that the machine's drift hits every variant alike:
(a) A/B toggles, timed without a profiler, step by step interleaved, medians: each config's step as
    train.py runs it (compiled, fused AdamW where torch has one), and the same step with one thing
    changed: the foreach AdamW instead of the fused one; the routing statistics cut to the load the
    routers' updates need (what computing statistics only on logged steps would save); the experts
    replaced by one dense SwiGLU of the same active FLOPs over every token, scaled by the token's gate
    sum (what is left is the router's cost: the step minus this is the expert dispatch's).
(b) A profile (torch.profiler) of --steps compiled steps of each config, every op's own time put in
    one region: matmuls, attention, the kernels inductor generated (norms, activations, router math,
    losses, statistics), the expert op's element-wise work, its gathers and scatters and its own
    Python, the router ops inductor leaves to ATen (top-k, sort, nonzero), the optimizer, the rest.
    The profiler adds a few microseconds to every op, so the profile's step is longer than (a)'s and
    many-op regions (the expert loop) are overstated: compare regions across configs, not to (a).

Random token batches at each config's shapes and vocabulary; fp32 on the CPU, bf16 autocast on CUDA.
"""

import argparse
import contextlib
import itertools
import time

import torch
import torch.nn.functional as F

import baselines
import experts
from pairs import swiglu
import lory
import routers
import softmax_routers
from bench import REPO, config_model, sync, time_interleaved

REGIONS = ('matmuls', 'attention (SDPA)', 'inductor kernels', 'experts: element-wise',
           'experts: gathers, scatters, zeros', 'experts: listing pairs', 'experts: Python, views',
           'router ops left to ATen', 'optimizer', 'other (Python, autograd)')
MATMULS = {'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::_grouped_mm'}
ELEMENTWISE = {'aten::silu', 'aten::mul', 'aten::mul_', 'aten::silu_backward', 'aten::linalg_vecdot', 'aten::sum',
               'aten::add', 'aten::add_', 'aten::sigmoid'}
MOVES = {'aten::index_select', 'aten::index_add_', 'aten::scatter_add_', 'aten::index_copy_', 'aten::fill_',
         'aten::zero_', 'aten::copy_', 'aten::index_put_'}
LISTING = {'aten::nonzero', 'aten::bincount', 'aten::cumsum', 'aten::diff', 'aten::_local_scalar_dense'}
ROUTER_OPS = {'aten::topk', 'aten::sort', 'aten::argsort', 'aten::nonzero', 'aten::median', 'aten::scatter',
              'aten::scatter_', 'aten::scatter_reduce_', 'aten::bincount', 'aten::cumsum', 'aten::gather'}


def region(event):
    """The region of one profiled op, from its name and the ops it runs inside."""
    outer, parent = None, event.cpu_parent
    while parent is not None:
        if parent.name.startswith('Optimizer.'):
            return 'optimizer'
        if parent.name.startswith('moe::') and outer is None:
            outer = 'experts'
        parent = parent.cpu_parent
    name = event.name
    if name.startswith('Optimizer.') or 'adam' in name:
        return 'optimizer'
    if name in MATMULS:
        return 'matmuls'
    if 'scaled_dot_product' in name:
        return 'attention (SDPA)'
    if 'CompiledFxGraph' in name:  # its own time is the C++ kernels inductor generated
        return 'inductor kernels'
    if outer == 'experts' or name.startswith('moe::'):
        if name in ELEMENTWISE:
            return 'experts: element-wise'
        if name in MOVES:
            return 'experts: gathers, scatters, zeros'
        if name in LISTING:
            return 'experts: listing pairs'
        return 'experts: Python, views'
    if name in ROUTER_OPS:
        return 'router ops left to ATen'
    return 'other (Python, autograd)'


@contextlib.contextmanager
def load_only_stats():
    """Every router's routing_stats cut to the load (train.py feeds it to the routers' updates)."""
    def load_only(gates, probs=None, logits=None):
        return {'load': (gates > 0).float().mean(0)}
    modules = [m for m in (routers, softmax_routers, baselines, lory) if hasattr(m, 'routing_stats')]
    saved = [m.routing_stats for m in modules]
    for m in modules:
        m.routing_stats = load_only
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.routing_stats = f


def dense_experts(model):
    """Each MoE layer's experts replaced by one SwiGLU of K times an expert's hidden size over every
    token, times the token's gate sum (so the router still gets a gradient): the MoE step without
    dispatch."""
    for module in model.modules():
        if isinstance(module, experts.Experts):
            E, D, H2 = module.w_in.shape
            KH = model.config.top_k * H2 // 2
            module.w_in = torch.nn.Parameter(torch.randn(D, 2 * KH) * 0.02)      # [D, 2KH]
            module.w_out = torch.nn.Parameter(torch.randn(KH, D) * 0.02)         # [KH, D]

            def forward(x, gates, sums=False, decode=False, m=module):
                y = swiglu(x @ m.w_in) @ m.w_out
                return y * gates.sum(-1, keepdim=True).to(y.dtype)
            module.forward = forward


def training_step(name, device, fused=None, stats=True, dispatch=True):
    """A compiled training step of configs/<name>.py as train.py takes it (the routers' updates
    included), traced now; returns it as a function of no arguments."""
    torch.manual_seed(0)
    model = config_model(name).to(device).train()
    if not dispatch:
        dense_experts(model)
    c = model.config
    optimizer = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), fused=fused)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    scope = {}
    exec((REPO / 'configs' / f'{name}.py').read_text(), {}, scope)
    batches = itertools.cycle([torch.randint(0, c.vocab_size, (2, scope['batch_size'], c.block_size),
                                             generator=gen).to(device) for _ in range(4)])
    autocast = torch.autocast(device.type, torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()

    def step():
        X, Y = next(batches)
        with autocast:
            _, loss, info = compiled(X, Y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if 'load' in info:
            model.update_routers(info['load'].float())
        sync(device)
    with contextlib.nullcontext() if stats else load_only_stats():
        step()  # compiles
    return step


def profile_regions(step, n_steps):
    """{region: ms per step} of n_steps profiled calls of step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    ms = dict.fromkeys(REGIONS, 0.0)
    for event in prof.events():
        ms[region(event)] += event.self_cpu_time_total / 1e3 / n_steps
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--configs', default='topk', help='MoE configs to account against configs/dense.py')
    p.add_argument('--reps', type=int, default=40, help='timed steps per variant (A/B)')
    p.add_argument('--steps', type=int, default=10, help='profiled steps per config')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    device, configs = torch.device(args.device), args.configs.split(',')
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")

    steps = {'dense': training_step('dense', device), 'dense, foreach AdamW': training_step('dense', device, False)}
    for name in configs:
        steps[name] = training_step(name, device)
        steps[f'{name}, foreach AdamW'] = training_step(name, device, fused=False)
        steps[f'{name}, statistics: load only'] = training_step(name, device, stats=False)
        if name not in ('remoe',):  # ReMoE has no fixed K to size the stand-in by
            steps[f'{name}, experts as one dense SwiGLU'] = training_step(name, device, dispatch=False)
    t = time_interleaved(steps, args.reps, warmup=1)
    print(f"\n(a) compiled training steps, medians of {args.reps} interleaved")
    print('| step | ms | dense tokens/s over this one\'s |\n|---|---|---|')
    for name, sec in t.items():
        print(f'| {name} | {1e3 * sec:.1f} | {t["dense"] / sec:.3f} |')

    names = ['dense', *configs]
    ms = {name: profile_regions(steps[name], args.steps) for name in names}
    print(f"\n(b) profile of {args.steps} compiled steps each, ms per step (own time of each op)")
    print('| region | ' + ' | '.join(names) + ' | ' + ' | '.join(f'{n} - dense' for n in configs) + ' |')
    print('|---' * (1 + len(names) + len(configs)) + '|')
    for r in REGIONS + ('total',):
        row = [sum(ms[n].values()) if r == 'total' else ms[n][r] for n in names]
        print(f'| {r} | ' + ' | '.join(f'{v:.1f}' for v in row) + ' | '
              + ' | '.join(f'{v - row[0]:+.1f}' for v in row[1:]) + ' |')


if __name__ == '__main__':
    main()
