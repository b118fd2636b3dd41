"""
The config system, as in nanoGPT: train.py's defaults are plain assignments at its top; a config
file is more plain assignments exec'd over them; --key=value overrides one of them.

    python train.py config/remoe.py --max_iters=500 --router=topk

A config file may be written configs/topk.py, config/topk.py, topk.py or topk. Every value keeps
the type of its default. Then come the checks that need neither a model nor data, so that a bad
value stops the run at once, with one line that names it and says what would be valid, instead
of a traceback an hour later. configure() does both and returns the config with '' defaults
resolved (device, dtype, tokenizer) and lr_decay_iters filled in.
"""
import ast
import os
from dataclasses import fields
from pathlib import Path

import torch

import data
import distributed
from checkpoint import CheckpointError, saved_config
from experts import resolve_impl
from model import GPTConfig
from routers import MOE_OPTIONS, ROUTERS, router_options

CONFIGS = Path(__file__).resolve().parent / 'configs'


class ConfigError(Exception):
    """A bad config value or command line; the message is one line for the user."""


def find_config(arg):
    """The config file `arg` names: a path that exists, or a config of configs/ by its name, written
    'topk', 'topk.py', 'configs/topk.py' or 'config/topk.py' (nanoGPT's folder name). Any other path
    that does not exist is an error: 'exp/topk.py' must not silently run configs/topk.py."""
    if os.path.isfile(arg):
        return arg
    parent = Path(arg).parent
    path = CONFIGS / f'{Path(arg).stem}.py'
    if str(parent) in ('.', 'config', 'configs') and Path(arg).suffix in ('', '.py') and path.is_file():
        return str(path)
    known = ', '.join(sorted(p.stem for p in CONFIGS.glob('*.py')))
    raise ConfigError(f"no config {arg!r}; the configs are: {known} (or give the path of an existing file)")


def parse(argv, defaults):
    """Config files and --key=value overrides applied, in order, to a copy of `defaults`; returns
    the config and the keys that a file or a flag set (what the user asked for, for resume)."""
    config, given = dict(defaults), set()

    def assign(key, value, where):
        if key not in config:
            raise ConfigError(f"unknown config key {key!r} in {where}")
        default = config[key]
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{key}={value!r} in {where}: expected a {type(default).__name__}, like {default!r}")
        config[key] = value
        given.add(key)

    for arg in argv:
        if not arg.startswith('--'):
            path = find_config(arg)
            if int(os.environ.get('RANK', 0)) == 0:
                print(f"config file: {path}")  # the file that ran, whatever name it was given as
            scope = {}
            try:
                exec(Path(path).read_text(), {}, scope)
            except Exception as e:
                raise ConfigError(f"{path} does not run ({type(e).__name__}: {e})") from None
            for key, value in scope.items():
                if not key.startswith('_'):
                    assign(key, value, path)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ConfigError(f"{arg!r}: overrides are written --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --router=topk
            assign(key, value, 'the command line')
    return config, given


# What --init_from=resume may change: how the run goes on, never what it trains. The rest would make
# the checkpoint another run's: the model's shape, the data and its order, a router's knobs, the
# optimizer's groups and its hyperparameters (AdamW's saved state would overwrite weight_decay and
# betas anyway). The learning-rate schedule is recomputed every step, so it may change.
RESUME_MAY_CHANGE = ('out_dir', 'init_from', 'data_dir', 'max_iters', 'eval_interval', 'log_interval', 'eval_iters',
                     'eval_only', 'always_save_checkpoint', 'sample_tokens', 'device', 'dtype', 'compile',
                     'expert_impl', 'ep_size', 'dist_timeout', 'max_skipped_steps', 'grad_clip', 'learning_rate',
                     'min_lr', 'warmup_iters', 'lr_decay_iters', 'decay_lr',
                     'ec_eval')  # (expert_choice: its evaluation rule; the weights are the same)


def resumed(config, given, defaults):
    """The run's config for --init_from=resume: the checkpoint's, with the values the command line
    (or a config file) sets among RESUME_MAY_CHANGE; setting anything else to another value is an
    error. Keys newer than the checkpoint take their defaults. Returns it and {key: (old, new)}."""
    try:
        saved, saved_world = saved_config(config['out_dir'])
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    run = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}
    changes, run['init_from'] = {}, 'resume'
    run['ep_size'] = config['ep_size']  # how this launch lays out its processes, not the run's: not inherited
    world = int(os.environ.get('WORLD_SIZE', 1))
    for key in sorted(given):
        if config[key] == run[key]:
            continue
        # batch_size is per process: another number of processes keeps the data order if the
        # global batch (what every rank draws, then slices) stays the same
        same_global = key == 'batch_size' and config[key] * world == run[key] * saved_world
        if key not in RESUME_MAY_CHANGE and not same_global:
            on = f" on {saved_world} processes" if key == 'batch_size' and saved_world > 1 else ''
            raise ConfigError(f"{key}={config[key]!r}: the run in {config['out_dir']} was trained with {key}="
                              f"{run[key]!r}{on}, which a resumed run cannot change: drop it to continue that run, "
                              f"or start a new run with another --out_dir")
        changes[key], run[key] = (run[key], config[key]), config[key]
    return run, changes


def model_args(config):
    """The GPTConfig fields among the config's keys."""
    return {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}


def ignored_options(c):
    """{key: why} of the options this config would ignore: a dense model's MoE options, the options
    that the chosen router does not read (routers.ROUTERS: each class lists its own) or reads only
    under some setting, and the datasets' options. GPTConfig.validate has checked the router's name."""
    if c['moe_every'] == 0:
        ignored = {key: 'in a dense model (moe_every=0)' for key in (*MOE_OPTIONS, *router_options())}
    else:  # the options of other routers, and those the router reads only under some setting
        router = ROUTERS[c['router']]
        ignored = {key: f"with router={c['router']!r}" for key in router_options() if key not in router.options}
        ignored.update(router.ignored(c))
    if c['dataset'] != 'web':
        ignored.update({key: f"with dataset={c['dataset']!r}" for key in ('hf_name', 'hf_files', 'hf_max_tokens')})
    if c['dataset'] != 'textfiles':
        ignored['data_files'] = f"with dataset={c['dataset']!r}"
    return ignored


def check(c, defaults):
    """Resolve the '' defaults and check every value that needs no model or data; raises ConfigError."""
    if c['init_from'] not in ('scratch', 'resume'):
        raise ConfigError(f"init_from={c['init_from']!r} is not 'scratch' or 'resume'")
    try:
        c['tokenizer'] = data.resolve_tokenizer(c['dataset'], c['tokenizer'])
    except data.DataError as e:
        raise ConfigError(str(e)) from None
    for name in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_iters', 'log_interval',
                 'eval_interval'):
        if c[name] < 1:
            raise ConfigError(f"{name}={c[name]} must be a positive integer")
    if not c['router_lr_scale'] > 0:
        raise ConfigError(f"router_lr_scale={c['router_lr_scale']} must be > 0 (it multiplies learning_rate "
                          f"for the routers)")
    if c['max_iters'] < 0:
        raise ConfigError(f"max_iters={c['max_iters']} must be >= 0 (0 only checks that the config starts)")
    if not c['learning_rate'] > 0:
        raise ConfigError(f"learning_rate={c['learning_rate']} must be > 0")
    if not (0 <= c['min_lr'] <= c['learning_rate']):
        raise ConfigError(f"min_lr={c['min_lr']} must be between 0 and learning_rate={c['learning_rate']} "
                          f"(the cosine decays from learning_rate down to min_lr)")
    for name, what in (('warmup_iters', '0 = no warm-up'), ('lr_decay_iters', '0 = max_iters')):
        if c[name] < 0:
            raise ConfigError(f"{name}={c[name]} must be >= 0 ({what})")
    for name in ('beta1', 'beta2'):
        if not 0 <= c[name] < 1:
            raise ConfigError(f"{name}={c[name]} must be in [0, 1) (AdamW's moment decay)")
    for name, what in (('grad_clip', '0 = no clipping'), ('weight_decay', '0 = none'),
                       ('sample_tokens', '0 = no sample'), ('seed', 'a non-negative integer'),
                       ('aux_loss_coef', '0 = none'), ('z_loss_coef', '0 = none')):
        if c[name] < 0:
            raise ConfigError(f"{name}={c[name]} must be >= 0 ({what})")
    if not c['rope_theta'] > 0:
        raise ConfigError(f"rope_theta={c['rope_theta']} must be > 0 (RoPE's base; 10000.0 is usual)")
    if c['hf_max_tokens'] < 1:
        raise ConfigError(f"hf_max_tokens={c['hf_max_tokens']} must be a positive integer")
    if c['max_skipped_steps'] < 0:
        raise ConfigError(f"max_skipped_steps={c['max_skipped_steps']} must be >= 0")
    if c['dist_timeout'] <= 0:
        raise ConfigError(f"dist_timeout={c['dist_timeout']} must be > 0 seconds")
    device = c['device'] = c['device'] or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but this machine has no CUDA GPU: use --device=cpu")
    if device != 'cpu' and not (device == 'cuda' or device.startswith('cuda:') and device[5:].isdigit()):
        raise ConfigError(f"device={device!r} is not cpu, cuda or cuda:N (the experts' custom ops are written for "
                          f"those two): use --device=cpu or --device=cuda")
    bf16 = device.startswith('cuda') and torch.cuda.is_bf16_supported()
    dtype = c['dtype'] = c['dtype'] or ('bfloat16' if bf16 else 'float32')
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ConfigError(f"dtype={dtype!r} is not float32, bfloat16 or float16")
    if dtype == 'float16' and not device.startswith('cuda'):
        raise ConfigError(f"dtype='float16' needs a CUDA GPU (on {device} it is emulated, many times slower): "
                          f"use --dtype=float32 or bfloat16")
    c['lr_decay_iters'] = c['lr_decay_iters'] or c['max_iters']
    moe = c['moe_every'] > 0
    if moe:  # a backend that does not exist, or that this device cannot run
        try:
            resolve_impl(c['expert_impl'], 'cuda' if device.startswith('cuda') else device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if c['compile'] and c['expert_impl'] == 'loop' and moe:
        raise ConfigError("expert_impl='loop' is the eager reference and does not compile: use --compile=False "
                          "or --expert_impl=grouped")
    gpt = GPTConfig(**model_args(c))
    try:
        gpt.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c['ep_size'] != 1:  # expert parallelism: checked before any process group exists
        if not moe:
            raise ConfigError(f"ep_size={c['ep_size']} needs MoE layers (moe_every > 0)")
        if not ROUTERS[c['router']].expert_parallel:
            raise ConfigError(f"ep_size={c['ep_size']} with router={c['router']!r} is not supported: every rank needs "
                              f"every expert's weights; use ep_size=1 (DDP)")
        problem = distributed.check_ep_size(c['ep_size'], int(os.environ.get('WORLD_SIZE', 1)), gpt.moe_shape()[0])
        if problem:
            raise ConfigError(problem)
        if c['compile']:  # the all-to-all's split sizes are data-dependent host values
            raise ConfigError(f"ep_size={c['ep_size']} runs eagerly: add --compile=False")
    for key, why in ignored_options(c).items():
        if c[key] != defaults[key]:
            raise ConfigError(f"{key}={c[key]!r} has no effect {why}: remove it")
    return c


def configure(argv, defaults):
    """parse (and, to resume, take the checkpoint's config), then check: the config a run trains
    with, and what the command line changed of a resumed run's, {key: (old, new)}."""
    config, given = parse(argv, defaults)
    changes = {}
    if config['init_from'] == 'resume':
        config, changes = resumed(config, given, defaults)
    return check(config, defaults), changes
