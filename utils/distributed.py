"""What DDP synchronises: only the trained parameters.

A trainer's model (see utils/training.py's Trainable) holds the frozen text encoders and UNet next to the few trained
tensors, because gradients reach the trained tensors only through a forward of the module DDP wraps. Left alone,
DDP would broadcast every frozen weight from rank 0 when it wraps the model (about 2 GB for SD-1.5, 6.8 GB for SDXL)
and every buffer before each forward. Nothing frozen needs that: every rank loads the same files.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def sync_only_trainables(model: nn.Module, trainables: Iterable[torch.Tensor]) -> list[str]:
    """Mark every parameter of ``model`` that is not in ``trainables``, and every buffer, as ignored by DDP (torch's
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``): not broadcast when DDP wraps the model,
    not in its gradient buckets, buffers not broadcast per forward. Call before ``accelerator.prepare``; harmless
    without DDP. Returns the ignored names.

    A trained tensor that is not a parameter of ``model`` would never be synchronised (ranks drift apart), so it is
    refused here rather than found out at the end of a run."""
    from torch.nn.parallel import DistributedDataParallel

    wanted = {id(p): p for p in trainables}
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [tuple(p.shape) for i, p in wanted.items() if i not in names]
    if missing:
        raise ValueError(f"trained tensors of shapes {missing} are not parameters of the {type(model).__name__} "
                         f"that DDP wraps: their gradients would not be synchronised across processes")
    ignored = [n for n, p in model.named_parameters() if id(p) not in wanted]
    ignored += [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return ignored
