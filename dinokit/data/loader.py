"""The DINOv2 training DataLoader: resumable order, per-sample seeding, masks, skip counting.

Determinism: batch k of a run is a pure function of (seed, rank, world_size, k), whatever
num_workers is and whether the run was resumed, and the union over ranks of their batches k is the
same for every world size at the same global batch. Nothing depends on worker RNG state:

- the batch sampler yields `(index, position)` pairs, position = the sample's place in the global
  stream (this rank's running count * world_size + rank, so ranks never share a position);
- each sample's augmentations draw from `torch.Generator().manual_seed(derive_seed(seed, AUG, position))`;
- the masks of global batch k (all ranks together: batch_size * world_size images) draw from
  `random.Random(derive_seed(seed, MASK, first position of global batch k))` inside the collate
  (which runs in the worker); each rank draws the whole global batch's masks, as the official
  collate would for one process, and keeps the rows of its own images. So a 2-rank run masks the
  same crops the same way as a 1-rank run of the same global batch (the price: each rank draws
  world_size times more masks, a small cost next to decoding and augmenting its images).

Skipped images: a file that cannot be decoded gives None from the dataset (with a warning naming
it); the collate drops it and reports `batch["n_skipped"]`. Counting in the batch survives worker
processes, unlike a counter on the dataset, which would live in each worker's copy. When every
sample of a batch failed, the batch has `n_images == 0`, `n_skipped == batch_size` and no crop keys:
the training loop should skip it (check `batch["n_images"] == 0` first).

Example:
    >>> mask_gen = MaskingGenerator(input_size=28 // 4, max_num_patches=0.5 * 7 * 7)
    >>> loader = make_train_loader(FashionMNIST(), MultiCropAugmentation(28, 12), batch_size=64,
    ...                            num_workers=2, seed=0, start_index=consumed, mask_generator=mask_gen)
    >>> for step, batch in zip(range(first_step, total_steps), loader):
    ...     if batch["n_images"] == 0: continue
    ...     consumed += 64   # store this in the checkpoint; resume with start_index=consumed
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinokit.data.batch_augment import BatchMultiCrop
from dinokit.data.collate import collate_data_and_cast, crops_and_masks, draw_masks, mask_fields
from dinokit.data.datasets import MultiCropDataset
from dinokit.data.masking import MaskingGenerator
from dinokit.data.sampler import ResumableRandomSampler

__all__ = ["MultiCropCollate", "PositionBatchSampler", "batch_to_device", "check_shared_memory", "derive_seed",
           "device_crops", "make_train_loader", "shared_memory_per_worker", "shared_memory_per_worker_sources"]

_MASK64 = (1 << 64) - 1
# Stream tags, so the augmentation and mask seeds of one position are unrelated.
AUG_STREAM = 1
MASK_STREAM = 2
BATCH_AUG_STREAM = 3


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a fast bijective 64-bit mixer (adjacent inputs -> unrelated outputs)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike hash()).

    >>> derive_seed(0, 1, 5) != derive_seed(0, 1, 6)
    True
    """
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1  # torch.manual_seed takes up to 2**64 - 1; 63 bits also fit a signed int64


class PositionBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite batches of `(dataset index, global position)` from a `ResumableRandomSampler`.

    Global position = local count * world_size + rank, unique across ranks.
    """

    def __init__(self, sampler: ResumableRandomSampler, batch_size: int) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ws, rank = self.sampler.world_size, self.sampler.rank
        stream = self.sampler.iter_with_positions()
        while True:
            yield [(index, p * ws + rank) for index, p in (next(stream) for _ in range(self.batch_size))]


class _SeededSamples(Dataset):
    """`[(index, position)] -> (position, sample or None)`, the sample seeded from its position."""

    def __init__(self, multicrop: MultiCropDataset, seed: int) -> None:
        self.multicrop = multicrop
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.multicrop)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        index, position = key
        g = torch.Generator().manual_seed(derive_seed(self.seed, AUG_STREAM, position))
        return position, self.multicrop.get(index, generator=g)


class MultiCropCollate:
    """Collate `(position, sample or None)` items: drop failures, draw masks, add bookkeeping.

    Masks are drawn for a whole group of `group_size` consecutive global positions (the global
    batch) and this batch keeps the rows of its own positions; `group_size=None` makes the batch
    its own group (one process).

    Returns the `collate_data_and_cast` dict plus
        - n_images: int, samples kept; n_skipped: int, samples dropped (undecodable);
        - labels: int64 (n_images,); positions: int64 (B,) global positions of the whole batch.
    With n_images == 0 only n_images, n_skipped, labels and positions are present.
    """

    def __init__(
        self,
        seed: int,
        mask_generator: Callable[..., Any],
        mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: torch.dtype = torch.float32,
        n_tokens: int | None = None,
        group_size: int | None = None,
        batch_transform: BatchMultiCrop | None = None,
        crops_on_device: bool = False,
    ) -> None:
        self.seed = int(seed)
        self.batch_transform = batch_transform
        self.crops_on_device = crops_on_device
        self.mask_generator = mask_generator
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = mask_probability
        self.dtype = dtype
        self.n_tokens = n_tokens
        self.group_size = group_size

    def _group(self, positions: list[int], kept: list[int]) -> tuple[int, int, list[int]]:
        """(group size, first position of the group, the kept samples' offsets in the group)."""
        if self.group_size is None:
            return len(positions), positions[0], kept
        start = positions[0] - positions[0] % self.group_size
        return self.group_size, start, [positions[i] - start for i in kept]

    def _masks(self, positions: list[int], kept: list[int], n_global_crops: int) -> torch.Tensor:
        """Masks of the kept samples' global crops, crop-major, cut from their group's masks."""
        group, start, offsets = self._group(positions, kept)
        n_tokens = self.n_tokens
        if n_tokens is None:
            if not isinstance(self.mask_generator, MaskingGenerator):
                raise ValueError("n_tokens is required when mask_generator is not a MaskingGenerator")
            n_tokens = self.mask_generator.num_patches
        rng = random.Random(derive_seed(self.seed, MASK_STREAM, start))
        masks, _ = draw_masks(n_global_crops * group, n_tokens, self.mask_ratio_tuple, self.mask_probability,
                              self.mask_generator, rng)
        # Crop c of the group's image i is row c * group + i (crop-major, as the collate stacks).
        return masks[[c * group + o for c in range(n_global_crops) for o in offsets]]

    def _batch_crops(self, positions: list[int], kept: list[int], images: list[torch.Tensor]) -> dict[str, Any]:
        """Crops of the kept images by the batch transform: its parameters are drawn for the whole
        group from one generator seeded by the group's first position, like the masks."""
        assert self.batch_transform is not None
        group, start, offsets = self._group(positions, kept)
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"batched crops need equally sized source images, got shapes {sorted(sizes)}")
        seed = derive_seed(self.seed, BATCH_AUG_STREAM, start)
        masks = self._masks(positions, kept, 2)
        if self.crops_on_device:
            # uint8 sources and the crop parameters' seed: `device_crops` crops them where the model is.
            return {"source_images": torch.stack(images), "crop_seed": seed,
                    "crop_rows": torch.tensor(offsets, dtype=torch.long), "crop_group": group,
                    **mask_fields(masks, int(masks.sum()))}
        g = torch.Generator().manual_seed(seed)
        crops = self.batch_transform(torch.stack(images), g, rows=offsets, group=group)
        return crops_and_masks(crops["global_crops"], crops["local_crops"], masks, int(masks.sum()), self.dtype)

    def __call__(self, items: Sequence[tuple[int, Any]]) -> dict[str, Any]:
        positions = [p for p, _ in items]
        kept = [i for i, (_, s) in enumerate(items) if s is not None]
        samples = [items[i][1] for i in kept]
        out: dict[str, Any] = {}
        if samples and self.batch_transform is not None:
            out = self._batch_crops(positions, kept, [s[0] for s in samples])
        elif samples:
            masks = self._masks(positions, kept, len(samples[0][0]["global_crops"]))
            out = collate_data_and_cast(
                samples,
                mask_ratio_tuple=self.mask_ratio_tuple,
                mask_probability=self.mask_probability,
                dtype=self.dtype,
                masks=masks,
            )
        out["n_images"] = len(samples)
        out["n_skipped"] = len(items) - len(samples)
        out["labels"] = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
        out["positions"] = torch.tensor(positions, dtype=torch.long)
        return out


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch dict with its tensors on `device` (asynchronous copies from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_crops(batch: dict[str, Any], transform: BatchMultiCrop, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A batch of `crops_on_device` (uint8 `source_images`) with its crops made on `device`: the
    same parameters as the loader would draw (host generator, same seed), so on the CPU the crops
    equal the loader's bit for bit."""
    batch = dict(batch)
    sources = batch.pop("source_images").to(device, non_blocking=True)
    g = torch.Generator().manual_seed(batch.pop("crop_seed"))
    crops = transform(sources, g, rows=batch.pop("crop_rows"), group=batch.pop("crop_group"))
    batch["collated_global_crops"] = crops["global_crops"].to(dtype)
    batch["collated_local_crops"] = crops["local_crops"].to(dtype)
    return batch


def shared_memory_per_worker(batch: int, global_size: int, local_size: int, local_number: int,
                             bytes_per_value: int = 4, prefetch_factor: int = 2) -> int:
    """Bytes of shared memory (/dev/shm) one loader worker holds at most: `prefetch_factor`
    collated batches of crops in flight (DataLoader's default 2), each 2 global and
    `local_number` local crops of `batch` images. Masks and indices are small beside them."""
    values = 3 * (2 * global_size**2 + local_number * local_size**2)
    return prefetch_factor * batch * values * bytes_per_value


def shared_memory_per_worker_sources(batch: int, source_size: int, prefetch_factor: int = 2) -> int:
    """The same for uint8 source images (`crops_on_device`): one 3 x S x S byte image per sample."""
    return prefetch_factor * batch * 3 * source_size**2


def check_shared_memory(workers: int, per_worker: int, path: str = "/dev/shm") -> str | None:
    """A warning when `workers` loader workers need more shared memory than `path` has free
    (containers often give 64 MiB), else None."""
    if workers == 0 or not os.path.isdir(path):
        return None
    free = shutil.disk_usage(path).free
    need = workers * per_worker
    if need <= free:
        return None
    return (f"{workers} loader worker(s) need up to {need / 2**20:,.0f} MiB of shared memory for batches in "
            f"flight, but {path} has {free / 2**20:,.0f} MiB free: workers may die with a bus error. Give the "
            f"container more (docker --shm-size), or lower data.num_workers or the batch per process.")


def make_train_loader(
    dataset: Dataset,
    transform: Callable[..., dict[str, Any]] | None,
    batch_size: int,
    num_workers: int,
    seed: int,
    start_index: int = 0,
    mask_generator: MaskingGenerator | Callable[..., Any] | None = None,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    *,
    shuffle: bool = True,
    n_tokens: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    batch_transform: BatchMultiCrop | None = None,
    crops_on_device: bool = False,
) -> DataLoader:
    """An infinite DataLoader of collated multi-crop batches for one rank.

    Args:
        dataset: base dataset `(PIL image, label)` / None, or a `MultiCropDataset` when `transform`
            is None.
        transform: multi-crop transform, e.g. `MultiCropAugmentation`.
        batch_size: images per batch on this rank (before dropping undecodable ones); the global
            batch is batch_size * world_size.
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: run seed; fixes the order, the crops and the masks.
        start_index: samples this rank already consumed (steps done * batch_size) when resuming,
            i.e. the global count divided by world_size.
        mask_generator: `MaskingGenerator` for the global crops' patch grid (required).
        mask_ratio_tuple, mask_probability, dtype, n_tokens: passed to `collate_data_and_cast`.
        rank, world_size: data sharding.
        shuffle: False -> sequential order (still sharded); mainly for debugging.
        pin_memory, prefetch_factor: passed to DataLoader.
        batch_transform: crops a whole batch at once (`BatchMultiCrop`); then `transform` must
            give each sample one fixed-size uint8 (3, S, S) image (`SourceImage`), and the
            crops of a global batch are drawn from one generator seeded by its first position.
        crops_on_device: with `batch_transform`, leave the cropping to `device_crops` in the
            training process (batches then carry uint8 `source_images`, a quarter of the float
            crops' bytes, and the crops are made on the model's device).

    Returns:
        DataLoader yielding dicts (see `MultiCropCollate`): collated_global_crops
        (2B, 3, G, G), collated_local_crops (L*B, 3, l, l), collated_masks (2B, N), ...,
        n_images, n_skipped, labels (B,), positions (B,). It never ends; its sampler is
        `loader.batch_sampler.sampler`.
    """
    if mask_generator is None:
        raise ValueError("make_train_loader needs a mask_generator, e.g. MaskingGenerator(input_size=crop // patch)")
    if transform is None:
        if not isinstance(dataset, MultiCropDataset):
            raise ValueError("transform is None but dataset is not a MultiCropDataset")
        multicrop = dataset
    else:
        multicrop = MultiCropDataset(dataset, transform)
    sampler = ResumableRandomSampler(
        len(multicrop), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size, start_index=start_index
    )
    collate = MultiCropCollate(seed, mask_generator, mask_ratio_tuple, mask_probability, dtype, n_tokens,
                               group_size=batch_size * world_size, batch_transform=batch_transform,
                               crops_on_device=crops_on_device)
    return DataLoader(
        _SeededSamples(multicrop, seed),
        batch_sampler=PositionBatchSampler(sampler, batch_size),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # The loader's own base-seed draw must not consume the training process's global RNG.
        generator=torch.Generator().manual_seed(seed),
    )
