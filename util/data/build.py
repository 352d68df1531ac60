"""The entry points of the input pipeline: ``--data_path`` -> a training source and an evaluation reader.

``--data_path`` is an ImageFolder root (``train/<class>/<image>``, ``val/...``), the built-in
``digits``, or tar shards (``util.shards``: a folder of shards, brace notation, ``pipe:`` URLs,
``digits-shards``). Pre-training also takes unlabelled data (``labels=False``): a flat folder of
images (``util.data.datasets.pretrain_images``) and shards without ``.cls`` members (img2dataset's
layout); their batches carry ``util.data.datasets.NO_LABEL``, and nothing on that path reads a label.
Both kinds give the same two objects:

* a :class:`TrainData` (:class:`util.data.datasets.FolderData` or :class:`util.data.shards.ShardData`),
  counted in global steps, which resumes at a step;
* an evaluation reader: each image once across ranks, no padding, ``(images, labels)`` batches.
"""
from typing import Iterable, Iterator, List, Optional, Protocol, Tuple

from util.data.datasets import (
    BUILTIN,
    FolderData,
    check_classes,
    check_folders,
    classification_datasets,
    eval_loader,
    image_folder,
    pretrain_images,
    pretrain_root,
    resolve_data_path,
)
from util.data.decode import collate as decode_collate
from util.data.decode import nvjpeg_finisher
from util.data.shards import DEFAULT_SHUFFLE_BUFFER, ShardData, ShardEvalData, is_shard_spec, labelled_shards, open_shards

import torch


class TrainData(Protocol):
    """A training data source, counted in global steps (one step = one batch per process)."""

    steps_per_epoch: int  # batches per process per epoch (drop_last)
    num_samples: int  # images in the training set (for logs)

    def batches(self, start_step: int) -> Iterator[Tuple[torch.Tensor, ...]]:
        """Every batch from global step ``start_step`` on: epoch ``start_step // steps_per_epoch``,
        skipping ``start_step % steps_per_epoch`` batches of it, then the following epochs, without
        end (the trainer stops). Each batch is (images [B, 3, H, W] float normalized, labels [B] long)."""
        ...


def build_train_data(data_path: str, transform, batch_size: int, rank: int, world_size: int, seed: int,
                     num_workers: int, pin_mem: bool, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                     device: Optional[torch.device] = None, labels: bool = True) -> TrainData:
    """The training source of ``data_path`` (folder or shards, split ``train``).

    Args:
        transform: the training transform; ``util.data.datasets.pretrain_transform(size, decode)`` or any
            transform wrapped by ``util.data.datasets.with_decode``.
        batch_size: per process.
        shuffle_buffer: shards only: samples each loader worker holds to shuffle.
        device: the training device; needed by ``decode='nvjpeg'`` (the GPU decodes each batch).
        labels: whether the job needs labels; False (pre-training) also takes unlabelled data.
    """
    finish = nvjpeg_finisher(transform, device)
    if is_shard_spec(data_path):
        shards = open_shards(data_path, "train") if not labels else labelled_shards(data_path, "train")
        return ShardData(shards, transform, batch_size, rank, world_size, seed, num_workers,
                         pin_mem, shuffle_buffer=shuffle_buffer, finish=finish, labels=labels)
    if labels:
        dataset = image_folder(resolve_data_path(data_path) / "train", transform, "training")
    else:
        dataset = pretrain_images(data_path, transform)
    return FolderData(dataset, batch_size, rank, world_size, seed, num_workers, pin_mem,
                      collate_fn=decode_collate if finish is not None else None, finish=finish)


def build_eval_data(data_path: str, transform, batch_size: int, rank: int, world_size: int, num_workers: int,
                    pin_mem: bool, split: str = "val") -> Iterable:
    """The evaluation reader of ``data_path``'s ``split``: this rank's disjoint share, no padding
    (``rank=0, world_size=1`` for the whole set). Iterating gives ``(images, labels)`` batches."""
    if is_shard_spec(data_path):
        return ShardEvalData(labelled_shards(data_path, split), transform, batch_size, rank, world_size, num_workers,
                             pin_mem)
    dataset = image_folder(resolve_data_path(data_path) / split, transform, "validation" if split == "val" else split)
    return eval_loader(dataset, batch_size, rank, world_size, num_workers, pin_mem)


def data_classes(data_path: str, split: str = "train") -> List[str]:
    """The class names of ``data_path`` (folder names, or the shard index's list): ``--nb_classes``."""
    if is_shard_spec(data_path):
        return list(labelled_shards(data_path, split).classes)
    return list(image_folder(resolve_data_path(data_path) / split, None, split).classes)


def classification_data(data_path: str, train_transform, val_transform, nb_classes: Optional[int], need_train: bool,
                        batch_size: int, rank: int, world_size: int, seed: int, num_workers: int, pin_mem: bool,
                        dist_eval: bool, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                        device: Optional[torch.device] = None) -> Tuple[Optional[TrainData], Iterable, int]:
    """Fine-tuning / linear probing data of ``data_path`` (folder or shards): (the training source, None
    when ``need_train`` is False; the validation reader, this rank's share with ``dist_eval``; the number
    of classes, ``--nb_classes`` checked against the data's)."""
    eval_rank, eval_world = (rank, world_size) if dist_eval else (0, 1)
    if is_shard_spec(data_path):
        train_classes = list(labelled_shards(data_path, "train").classes) if need_train else None
        nb_classes = check_classes(train_classes, list(labelled_shards(data_path, "val").classes), nb_classes, data_path)
        train = build_train_data(data_path, train_transform, batch_size, rank, world_size, seed, num_workers, pin_mem,
                                 shuffle_buffer, device) if need_train else None
        return train, build_eval_data(data_path, val_transform, batch_size, eval_rank, eval_world, num_workers,
                                      pin_mem), nb_classes
    train_set, val_set, nb_classes = classification_datasets(data_path, train_transform, val_transform, nb_classes,
                                                             need_train)
    finish = nvjpeg_finisher(train_transform, device) if need_train else None
    train = FolderData(train_set, batch_size, rank, world_size, seed, num_workers, pin_mem,
                       collate_fn=decode_collate if finish is not None else None, finish=finish) if need_train else None
    return train, eval_loader(val_set, batch_size, eval_rank, eval_world, num_workers, pin_mem), nb_classes


def check_pretrain_data(data_path: str) -> None:
    """Refuse a ``--data_path`` pre-training cannot read before a run starts: shards without a
    training index, a folder with neither ``train/`` nor images of its own (labels are optional)."""
    if is_shard_spec(data_path):
        open_shards(data_path, "train")
    elif data_path != BUILTIN:
        pretrain_root(data_path)


def check_data(data_path: str, splits: List[str]) -> None:
    """Refuse a ``--data_path`` that lacks these labelled splits before a run starts (fine-tuning,
    probing): the class folders of an ImageFolder root (``util.data.datasets.check_folders``), the
    index of each split of shards, with labels."""
    if is_shard_spec(data_path):
        for split in splits:
            labelled_shards(data_path, split)
    else:
        check_folders(data_path, splits)
