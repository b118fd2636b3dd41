"""
Checkpoints: what a run saves, how it resumes, and what can never destroy a saved run.

out_dir/ckpt.pt holds the full model (expert-parallel slices gathered), the optimizer, the
iteration, the config and the RNG and data-order state, so that --init_from=resume continues as
if the run had never stopped. It is never replaced by something worse:

- writes are atomic: a temp file, flushed to the disk, then renamed over the old checkpoint, so a
  process killed at any instant (or a machine losing power) leaves the old or the new one;
- weights or optimizer moments with a NaN/inf are not written (nor, decided in train.py, anything
  while the steps are diverging);
- a new run (init_from='scratch') refuses an out_dir that holds one.

Ctrl-C and SIGTERM save one too: see StopSignals. Loading uses torch.load(weights_only=True): a
checkpoint holds tensors and plain values, never code.
"""
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict

import torch

import distributed
from model import GPT, GPTConfig


class CheckpointError(Exception):
    """A checkpoint or out_dir that cannot be used; the message is one line for the user."""


# out_dir/ckpt.pt is what evaluations save: the latest, or with always_save_checkpoint=False the
# best so far (and what sample.py reads). A stop in that mode must not put the current weights over
# the best ones, so it writes ckpt-stop.pt instead, which a later ckpt.pt supersedes (and deletes).
CKPT, STOP_CKPT = 'ckpt.pt', 'ckpt-stop.pt'


def resume_path(out_dir):
    """The checkpoint --init_from=resume continues: ckpt-stop.pt where a stop left one, else ckpt.pt."""
    stopped = os.path.join(out_dir, STOP_CKPT)
    return stopped if os.path.exists(stopped) else os.path.join(out_dir, CKPT)


def check_out_dir(out_dir, init_from):
    """Before any work: the folder can be written, and a new run would not overwrite an old one."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise CheckpointError(f"out_dir={out_dir!r} is not writable ({e.strerror}): "
                              f"pass --out_dir=<a folder you can write to>") from None
    old = [name for name in (CKPT, STOP_CKPT) if os.path.exists(os.path.join(out_dir, name))]
    if init_from == 'scratch' and old:
        raise CheckpointError(f"{out_dir}/{old[0]} holds an earlier run that a new one would overwrite: continue it "
                              f"with --init_from=resume, or train in another --out_dir (or delete that one)")


def save_checkpoint(ckpt, path):
    """Write atomically: a temp file, flushed to the disk, then renamed over the old checkpoint."""
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:  # the rename itself is on the disk once the folder is
        os.fsync(folder)
    finally:
        os.close(folder)


def all_finite(state):
    """True if every tensor in a (nested) state dict is free of NaN and inf."""
    if torch.is_tensor(state):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def load_checkpoint(path, device='cpu', mmap=False):
    """mmap=True maps the file instead of reading it: cheap when only the plain values are needed."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py) or set --out_dir")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
        missing = {'model', 'model_args'} - set(ckpt)
        if missing:
            raise KeyError(', '.join(sorted(missing)))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                              f"delete it or set --out_dir to another run") from None
    return ckpt


def saved_config(out_dir):
    """The training config of the run that --init_from=resume would continue in out_dir, and the
    number of processes it ran on (batch_size is per process)."""
    path = resume_path(out_dir)
    ckpt = load_checkpoint(path, mmap=True)
    if not isinstance(ckpt.get('config'), dict):
        raise CheckpointError(f"{path} holds no training config (it was not written by train.py): "
                              f"train a new run in another --out_dir")
    return ckpt['config'], ckpt.get('world_size', 1)


def model_from_checkpoint(ckpt, **overrides):
    """Rebuild the GPT a checkpoint was saved from; overrides change non-architectural fields."""
    try:
        model = GPT(GPTConfig(**{**ckpt['model_args'], **overrides}))
        model.load_state_dict(ckpt['model'])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint does not fit this code's GPT ({str(e).splitlines()[0]})") from None
    return model


def save_training(path, model, optimizer, d, scaler=None, **state):
    """Every rank calls (the expert slices are gathered); rank 0 writes model, optimizer, the float16
    loss scaler's state and `state` (iteration, config, RNG states, ...). Returns why it did not
    write, or None."""
    model_state = distributed.full_state_dict(model, d)
    optimizer_state = distributed.full_optimizer_state(optimizer, model, d)
    if scaler is not None and scaler.is_enabled():  # float16: else a resume restarts the loss scale
        state['scaler'] = scaler.state_dict()
    if not d.master:
        return None
    if not all_finite(model_state) or not all_finite(optimizer_state['state']):
        return 'the weights or the optimizer state hold NaN/inf'
    save_checkpoint({'model': model_state, 'optimizer': optimizer_state, 'model_args': asdict(model.config),
                     **state}, path)
    return None


class Saver:
    """The training loop's checkpoints: saves the whole run to `path` and remembers which iteration
    the file on disk holds, so that a run that may not save (its last steps diverged, or its state
    holds NaN/inf) can say which checkpoint stays. Every rank calls save (the experts are gathered)."""

    def __init__(self, out_dir, model, optimizer, scaler, d, data_generator, keep_best, on_disk=None, **fixed):
        self.out_dir, self.model, self.optimizer, self.scaler = out_dir, model, optimizer, scaler
        self.d, self.data_generator, self.keep_best = d, data_generator, keep_best
        self.path = os.path.join(out_dir, CKPT)
        self.on_disk = on_disk  # iteration of the checkpoint in `path`, None before the first
        self.fixed = fixed  # what every checkpoint of the run holds alike: config, tokenizer

    def save(self, iter_num, best_val_loss, diverging=False, stopping=False):
        """Save the run at iter_num, unless it is diverging (the last good checkpoint stays). A stop
        of a run that keeps only its best checkpoint (keep_best) writes ckpt-stop.pt instead."""
        path = os.path.join(self.out_dir, STOP_CKPT) if stopping and self.keep_best else self.path
        rng = {'torch': torch.get_rng_state(), 'data': self.data_generator.get_state()}
        why = 'the last steps had NaN/inf gradients' if diverging else save_training(
            path, self.model, self.optimizer, self.d, scaler=self.scaler, iter_num=iter_num,
            best_val_loss=best_val_loss, rng=rng, **self.fixed)
        if self.d.master:
            print(f"not saving iteration {iter_num}: {why} ({self.path} stays the one from {self.on_disk_str()})"
                  if why else f"saved checkpoint to {path}")
        if not why and path == self.path:
            self.on_disk = iter_num
            if self.d.master and os.path.exists(os.path.join(self.out_dir, STOP_CKPT)):
                os.remove(os.path.join(self.out_dir, STOP_CKPT))  # superseded: resume takes ckpt.pt again

    def on_disk_str(self):
        return 'none: no checkpoint was written' if self.on_disk is None else f'iteration {self.on_disk}'


def restore_training(ckpt, model, optimizer, scaler, d, data_generator):
    """The optimizer (this rank's slice of the expert moments, whatever ep_size wrote it), the
    float16 loss scale, the global RNG and the data order of a checkpoint, into a freshly built run."""
    optimizer.load_state_dict(distributed.shard_optimizer_state(ckpt['optimizer'], optimizer, model, d))
    if scaler.is_enabled() and 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    torch.set_rng_state(ckpt['rng']['torch'])
    data_generator.set_state(ckpt['rng']['data'])


class StopSignals:
    """Ctrl-C and SIGTERM, taken by a thread of their own so that they are seen at once, even while
    a long step runs in C++ (a Python signal handler would wait for it to return). The caller must
    have blocked both signals before any other thread started (they inherit the mask):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}).

    Before training starts the first signal ends the process: there is nothing to save. Once
    `training` is set, the first one is recorded in `signum`: the loop looks at it before every
    micro-step, drops a partial step, saves the last completed one and stops (train.py), and a
    second one, a second or more later, ends the process at once, the checkpoint on disk being the
    last one completed. Signals within a second of each other count once: under torchrun, Ctrl-C
    brings SIGINT from the terminal and SIGTERM from torchrun, which forwards a SIGTERM to every
    rank; `agreed` makes all ranks stop at the same micro-step whichever ranks got one."""

    def __init__(self, verbose=True):
        self.signum, self.time, self.training, self.verbose = None, 0.0, False, verbose
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            signum = signal.sigwait({signal.SIGINT, signal.SIGTERM})
            name = signal.Signals(signum).name
            if self.signum is not None and time.time() - self.time < 1.0:
                continue
            if self.signum is not None or not self.training:
                if self.verbose:
                    print(f"{name}: stopping now, without saving", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            self.signum, self.time = signum, time.time()
            if self.verbose:
                print(f"{name}: stopping after this micro-step, saving the last completed step (again to stop "
                      f"at once)", flush=True)

    def agreed(self, d):
        """The signal number if any rank got one, so that every rank stops at the same step (a
        collective under several processes: every rank calls it at the same point of the loop)."""
        if d.world_size > 1:
            flag = torch.tensor(float(self.signum is not None), device=d.device)
            if distributed.all_reduce_mean(flag, d).item() > 0 and self.signum is None:
                self.signum = signal.SIGTERM
        return self.signum
