"""Batches that a killed run can resume mid-epoch, and augmentation seeded per sample.

The order of an epoch depends only on (seed, epoch); rank r of W takes every W-th index (padded
like DistributedSampler); a resumed run skips the batches it already trained on. Each sample's
augmentation is seeded by (seed, epoch, index), so it does not depend on worker processes or on
where the previous run stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from emae.seeding import derive_seed, seeded


@dataclass(eq=False)
class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of (dataset index, augmentation seed); drops the last incomplete batch.

    With gradient accumulation (`accum_iter` batches per optimizer step) an epoch yields a whole
    number of steps: the batches of a last incomplete step are dropped too, so no gradient is left
    over into the next epoch (or lost from a checkpoint written at the epoch's end).
    """

    dataset_size: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    drop_last: bool = True
    accum_iter: int = 1
    epoch: int = field(default=0, init=False)
    start_batch: int = field(default=0, init=False)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
            order = torch.randperm(self.dataset_size, generator=g).tolist()
        else:
            order = list(range(self.dataset_size))
        per_rank = -(-self.dataset_size // self.world_size)
        order += order[: per_rank * self.world_size - len(order)]  # pad so ranks get equal shares
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        per_rank = -(-self.dataset_size // self.world_size)
        batches = per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)
        return batches - batches % self.accum_iter

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self._rank_indices()
        for b in range(self.start_batch, len(self)):
            batch = indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, derive_seed(self.seed, "augment", self.epoch, i)) for i in batch]


class SeededDataset(Dataset):
    """Wraps a data set so that item (index, seed) is transformed under that seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with seeded(seed):
            return self.dataset[index]
