"""The one DataLoader builder: every loader the project makes, for training or evaluation, comes from
:func:`build_loader`, so that every loader worker survives the SIGTERM a scheduler sends to every
process of a task (``util.run.preempt.worker_init``) and the training process writes its checkpoint.

A worker without it dies of that SIGTERM, and the DataLoader turns a dead worker into an error in
the training process at once ("DataLoader worker (pid N) is killed by signal: Terminated"), before
the checkpoint: a preempted run would lose everything since its last save.
"""
import os
from functools import partial
from typing import Any, Callable, Iterable, Optional

from util.run.preempt import worker_init

from torch.utils.data import DataLoader, Dataset, Sampler


def build_loader(
    dataset: Dataset,
    *,
    batch_size: Optional[int] = 1,
    sampler: Optional[Sampler] = None,
    batch_sampler: Optional[Iterable] = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    persistent: bool = False,
    collate_fn: Optional[Callable[[list], Any]] = None,
) -> DataLoader:
    """A DataLoader whose workers outlive a scheduler's SIGTERM (only this process may end them).

    Args:
        dataset: map-style or iterable dataset.
        batch_size, sampler, batch_sampler, drop_last, collate_fn: as ``torch.utils.data.DataLoader``
            (``batch_size=None``: the dataset yields whole batches; ``batch_sampler`` excludes
            ``batch_size``, ``sampler`` and ``drop_last``).
        num_workers: loader processes (0: load in this process).
        pin_memory: page-locked batches, for faster host-to-GPU copies.
        persistent: keep the workers between iterations over the loader (epochs) instead of starting
            new ones each time; ignored without workers.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        batch_sampler=batch_sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0,
        collate_fn=collate_fn,
        # bound to the pid of the process that builds the loader: the one its workers obey
        worker_init_fn=partial(worker_init, os.getpid()),
    )
