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


def check_out_dir(out_dir, init_from):
    """Before any work: the folder can be written, and a new run would not overwrite an old one."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise CheckpointError(f"out_dir={out_dir!r} is not writable ({e.strerror}): "
                              f"pass --out_dir=<a folder you can write to>") from None
    if init_from == 'scratch' and os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
        raise CheckpointError(f"{out_dir}/ckpt.pt holds an earlier run that a new one would overwrite: continue it "
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


def load_checkpoint(path, device='cpu'):
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py) or set --out_dir")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        missing = {'model', 'model_args'} - set(ckpt)
        if missing:
            raise KeyError(', '.join(sorted(missing)))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}): "
                              f"delete it or set --out_dir to another run") from None
    return ckpt


def model_from_checkpoint(ckpt, **overrides):
    """Rebuild the GPT a checkpoint was saved from; overrides change non-architectural fields."""
    try:
        model = GPT(GPTConfig(**{**ckpt['model_args'], **overrides}))
        model.load_state_dict(ckpt['model'])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint does not fit this code's GPT ({str(e).splitlines()[0]})") from None
    return model


def save_training(path, model, optimizer, d, **state):
    """Every rank calls (the expert slices are gathered); rank 0 writes model, optimizer and
    `state` (iteration, config, RNG states, ...). Returns why it did not write, or None."""
    model_state = distributed.full_state_dict(model, d)
    optimizer_state = distributed.full_optimizer_state(optimizer, model, d)
    if not d.master:
        return None
    if not all_finite(model_state) or not all_finite(optimizer_state['state']):
        return 'the weights or the optimizer state hold NaN/inf'
    save_checkpoint({'model': model_state, 'optimizer': optimizer_state, 'model_args': asdict(model.config),
                     **state}, path)
    return None


def restore_training(ckpt, model, optimizer, d, data_generator):
    """The optimizer (this rank's slice of the expert moments, whatever ep_size wrote it), the
    global RNG and the data order of a checkpoint, into a freshly built run."""
    optimizer.load_state_dict(distributed.shard_optimizer_state(ckpt['optimizer'], optimizer, model, d))
    torch.set_rng_state(ckpt['rng']['torch'])
    data_generator.set_state(ckpt['rng']['data'])


class StopSignals:
    """Ctrl-C and SIGTERM, taken by a thread of their own so that they are seen at once, even while
    a long step runs in C++ (a Python signal handler would wait for it to return). The caller must
    have blocked both signals before any other thread started (they inherit the mask):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}).

    Before training starts the first signal ends the process: there is nothing to save. Once
    `training` is set, the first one is recorded in `signum` (the loop saves and stops after the
    step under way) and a second one, a second or more later, ends the process at once, the
    checkpoint on disk being the last one completed. Signals within a second of each other count
    once: under torchrun, Ctrl-C brings SIGINT from the terminal and SIGTERM from torchrun."""

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
                print(f"{name}: saving a checkpoint after this step, then stopping (again to stop at once)",
                      flush=True)
