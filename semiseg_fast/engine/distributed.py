"""Multi-process data parallel training through ``torchrun`` (one process per GPU, or CPU on gloo).

``init_distributed()`` reads torchrun's variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and
joins the process group (NCCL on CUDA, gloo on CPU); without them it is the single process
``DistEnv()``, whose collectives are identities, so no method needs an ``if distributed``.

What is synchronised, and how (all with tensor collectives, never pickled objects):
- gradients: ``DistributedDataParallel`` (the trainer wraps the method, whose ``forward`` is its
  loss computation); buffers are *not* broadcast every step (a VOC-sized U2PL bank is GBs) but
  kept identical by construction: every rank applies the same gathered updates;
- batch norm: ``SyncBatchNorm`` on CUDA; on CPU (gloo, where torch's SyncBatchNorm refuses to run)
  ``CPUSyncBatchNorm2d`` below, the same statistics with a differentiable all-reduce;
- memory banks: the keys a step offers are gathered from all ranks (``gather``) and every rank
  enqueues the same global set, in rank order, as the official codes' ``concat_all_gather``;
- running statistics of methods (MLLC's class counts and prototypes): summed with ``all_reduce``
  (differentiable and ``torch.compile``-traceable, via functional collectives);
- EMA teachers: identical because the students are (same initial weights, broadcast by DDP at
  construction, and the same averaged gradients);
- evaluation: each rank scores a shard of the validation set; one all-reduce sums the confusion
  matrices.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ..collectives import DistEnv

__all__ = ["CPUSyncBatchNorm2d", "DistEnv", "convert_sync_batchnorm", "init_distributed"]


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): NCCL on
    CUDA, gloo on CPU. Without those variables: the single process ``DistEnv()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"RANK={rank} WORLD_SIZE={world}")
    return DistEnv(rank, world, local_rank)


class CPUSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    For CPU process groups (gloo), where ``nn.SyncBatchNorm`` refuses to run: per-channel sums,
    sums of squares and counts are all-reduced (float64, so the E[x^2] - E[x]^2 form keeps the
    precision of a local batch norm) and the all-reduce's backward sums the gradients, so the
    result equals BatchNorm2d on the concatenated batch, running statistics included.
    """

    def __init__(self, *args, env: DistEnv | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.env = env or DistEnv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float [B, C, H, W] -> float [B, C, H, W], same dtype."""
        if not (self.training and self.env.enabled):
            return super().forward(x)
        c = x.shape[1]
        x64 = x.double()
        count = x64.new_full((1,), x.numel() / c)
        stats = self.env.all_reduce(torch.cat((x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), count)))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype).view(1, c, 1, 1)) * scale.view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``module`` synchronised over ranks (``nn.SyncBatchNorm`` on CUDA).

    Parameters and buffers keep their identity (EMA helpers built earlier stay valid)."""
    if not env.enabled:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module, env)


def _convert_cpu(module: nn.Module, env: DistEnv) -> nn.Module:
    # In place (class swap), so the parameter and buffer tensors stay the very objects that EMA
    # helpers and optimizers already hold; torch's CUDA conversion also reuses them.
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = CPUSyncBatchNorm2d
            m.env = env
    return module
