"""An infinite, resumable, rank-sharded random sampler whose global order ignores the world size.

DINOv2 trains for a number of iterations, not epochs, so the index stream never ends. The GLOBAL
stream is the concatenation of epoch permutations: global position g holds index
`perm_e[g % n]` with `e = g // n` and `perm_e = torch.randperm(n, generator=Generator().manual_seed(seed + e))`.
Rank r of world_size takes the positions r, r + world_size, r + 2 * world_size, ... So:

- the ranks never share a position, and within an epoch's n positions they see disjoint indices
  that together cover the dataset (no padding, no repeats, whatever n and world_size);
- the global stream does not depend on the world size: a run on 2 ranks with per-rank batch B/2
  sees exactly the images of a 1-rank run with batch B, batch for batch, and a run can resume on
  another world size from the number of samples consumed globally (rank r then starts at local
  count `consumed // world_size`).

A rank's state is one integer, the number of indices it has consumed. With DataLoader
prefetching the sampler runs ahead of training, so its own counter over-counts; the training loop
should store `steps * global_batch` itself and build the samplers with
`start_index = that // world_size` (`state_dict()` is exact only when nothing is prefetched).

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
        shuffle: False -> every epoch is 0..n-1 in order (still sharded).
        rank: this process's rank in [0, world_size).
        world_size: number of ranks sharing the data.
        start_index: indices this rank has already consumed; its next global position is
            `start_index * world_size + rank`.
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
        self.consumed = int(start_index)
        self._cache: tuple[int, list[int]] | None = None  # (epoch, its permutation)

    def permutation(self, epoch: int) -> list[int]:
        """The global order of `epoch`: all n indices."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.dataset_len
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            perm = list(range(n))
        self._cache = (epoch, perm)
        return perm

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices among the n global positions of `epoch`, in order (their counts
        differ by at most one between ranks)."""
        first = (self.rank - epoch * self.dataset_len) % self.world_size
        return self.permutation(epoch)[first :: self.world_size]

    def global_position(self, consumed: int | None = None) -> int:
        """Global stream position of this rank's next index after `consumed` (default: current)."""
        return (self.consumed if consumed is None else consumed) * self.world_size + self.rank

    def position(self, consumed: int | None = None) -> tuple[int, int]:
        """(epoch, offset in the epoch's global order) of this rank's next index."""
        return divmod(self.global_position(consumed), self.dataset_len)

    def __iter__(self) -> Iterator[int]:
        for index, _ in self.iter_with_positions():
            yield index

    def iter_with_positions(self) -> Iterator[tuple[int, int]]:
        """Yield `(index, p)` forever, p = this rank's running count (start_index, +1, ...).

        Continues from the current position and advances it as items are yielded, so
        `state_dict()` after taking k items counts them. The item's global position is
        `p * world_size + rank`.
        """
        while True:
            epoch, offset = self.position()
            p = self.consumed
            self.consumed = p + 1
            yield self.permutation(epoch)[offset], p

    def state_dict(self) -> dict[str, Any]:
        """Position and the settings it is only meaningful with (`epoch` / `offset` are informative)."""
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
        if "consumed" not in state:
            raise ValueError(f"sampler state has no 'consumed' count (keys: {sorted(state)})")
        self.consumed = int(state["consumed"])

    def __repr__(self) -> str:
        epoch, offset = self.position()
        return (
            f"ResumableRandomSampler(n={self.dataset_len}, seed={self.seed}, rank={self.rank}/{self.world_size}, "
            f"epoch={epoch}, offset={offset})"
        )
