"""An infinite, resumable, rank-sharded random sampler.

DINOv2 trains for a number of iterations, not epochs, so the index stream never ends; epoch e is
`torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`, padded by wrapping around
to a multiple of world_size and dealt out to ranks interleaved (`perm[rank::world_size]`), so within
an epoch the ranks see disjoint indices that together cover the dataset (the padding repeats at
most world_size - 1 indices). The position is one integer per rank, the number of indices this
rank has consumed, which is all a checkpoint needs to continue with exactly the next index.

With DataLoader prefetching the sampler runs ahead of training, so its own counter over-counts;
the training loop should store `steps * batch_size` itself and build the sampler with
`start_index=` that value (`state_dict()` is exact only when nothing is prefetched).

Example:
    >>> s = ResumableRandomSampler(10, seed=0, rank=0, world_size=2)
    >>> it = iter(s); first = [next(it) for _ in range(7)]     # 5 per epoch, then epoch 1
    >>> s2 = ResumableRandomSampler(10, seed=0, rank=0, world_size=2, start_index=7)
    >>> next(iter(s2)) == next(it)
    True
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableRandomSampler"]


class ResumableRandomSampler(Sampler[int]):
    """Infinite stream of dataset indices for one rank; see the module docstring.

    Args:
        dataset_len: n, number of samples.
        seed: base seed; epoch e shuffles with seed + e.
        shuffle: False -> every epoch is 0..n-1 in order (still padded and sharded).
        rank: this process's rank in [0, world_size).
        world_size: number of ranks sharing the data.
        start_index: indices this rank has already consumed (epoch = start_index // per_rank_len,
            offset = the remainder).

    Attributes:
        per_rank_len: ceil(n / world_size), indices per rank per epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.dataset_len = int(dataset_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.per_rank_len = -(-self.dataset_len // self.world_size)
        self.consumed = int(start_index)
        self._cache: tuple[int, list[int]] | None = None  # (epoch, this rank's indices)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's `per_rank_len` indices of `epoch`, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.dataset_len
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            perm = torch.arange(n)
        total = self.per_rank_len * self.world_size
        if total > n:  # wrap around (repeatedly if world_size > n) so every rank gets as many
            perm = perm.repeat(-(-total // n))[:total]
        indices = perm[self.rank :: self.world_size].tolist()
        self._cache = (epoch, indices)
        return indices

    def position(self, consumed: int | None = None) -> tuple[int, int]:
        """(epoch, offset in epoch) after `consumed` indices (default: the current count)."""
        return divmod(self.consumed if consumed is None else consumed, self.per_rank_len)

    def __iter__(self) -> Iterator[int]:
        for index, _ in self.iter_with_positions():
            yield index

    def iter_with_positions(self) -> Iterator[tuple[int, int]]:
        """Yield `(index, p)` forever, p = this rank's running count (start_index, +1, ...).

        Continues from the current position and advances it as items are yielded, so
        `state_dict()` after taking k items counts them.
        """
        while True:
            epoch, offset = self.position()
            indices = self.epoch_indices(epoch)
            for i in range(offset, len(indices)):
                p = self.consumed
                self.consumed = p + 1
                yield indices[i], p

    def state_dict(self) -> dict[str, Any]:
        """Position and the settings it is only meaningful with."""
        epoch, offset = self.position()
        return {
            "consumed": self.consumed,
            "epoch": epoch,
            "offset": offset,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Raises ValueError when the stream would not be the same one."""
        for key in ("seed", "dataset_len", "world_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                    "the saved position would point into a different index stream"
                )
        if "consumed" in state:
            self.consumed = int(state["consumed"])
        else:
            self.consumed = int(state["epoch"]) * self.per_rank_len + int(state["offset"])

    def __repr__(self) -> str:
        epoch, offset = self.position()
        return (
            f"ResumableRandomSampler(n={self.dataset_len}, seed={self.seed}, rank={self.rank}/{self.world_size}, "
            f"epoch={epoch}, offset={offset})"
        )
