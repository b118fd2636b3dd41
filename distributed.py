"""
Several processes: process groups and data parallelism (DDP).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process it starts; without them this is
a single process and every function here is a no-op, so train.py reads the same either way.
The backend follows the device: NCCL between GPUs, gloo between CPU processes.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = 'cpu'

    @property
    def master(self):  # the one process that logs and writes checkpoints
        return self.rank == 0


def init(device):
    """Join the process group torchrun set up (if any). `device` is 'cpu', 'cuda' or 'cuda:N'."""
    if 'RANK' not in os.environ:
        return Dist(device=device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return Dist(rank, local_rank, world_size, device)


def wrap(model, d):
    """DDP averages gradients over ranks during backward; with one process, the model itself."""
    if d.world_size == 1:
        return model
    return DDP(model, device_ids=[d.local_rank] if d.device.startswith('cuda') else None)


def all_reduce_mean(t, d):
    """The mean of t over ranks (a copy), so every rank takes the same decision from it."""
    if d.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG if d.device.startswith('cuda') else dist.ReduceOp.SUM)
        if not d.device.startswith('cuda'):
            t /= d.world_size  # gloo has no AVG
    return t


def barrier(d):
    if d.world_size > 1:
        dist.barrier()


def destroy(d):
    # every group must be destroyed before exit, or the interpreter can abort on shutdown
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
