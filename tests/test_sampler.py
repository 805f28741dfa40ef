"""Resumable sampler and the training loader's order / crop / mask determinism."""

from __future__ import annotations

import pickle
from itertools import islice

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinokit.data.loader import MultiCropCollate, derive_seed, make_train_loader
from dinokit.data.masking import MaskingGenerator
from dinokit.data.sampler import ResumableRandomSampler
from dinokit.data.transforms import MultiCropAugmentation


def _take(sampler: ResumableRandomSampler, k: int) -> list[int]:
    return list(islice(iter(sampler), k))


# ----------------------------------------------------------------------------- sampler


def test_epochs_are_seeded_permutations() -> None:
    s = ResumableRandomSampler(7, seed=3)
    stream = _take(s, 14)
    for e in range(2):
        assert stream[7 * e : 7 * (e + 1)] == torch.randperm(7, generator=torch.Generator().manual_seed(3 + e)).tolist()
    assert _take(ResumableRandomSampler(5, seed=0, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_with_start_index_continues_the_stream(world_size: int) -> None:
    for rank in range(world_size):
        full = _take(ResumableRandomSampler(7, seed=1, rank=rank, world_size=world_size), 30)
        resumed = _take(ResumableRandomSampler(7, seed=1, rank=rank, world_size=world_size, start_index=10), 20)
        assert resumed == full[10:]


def test_state_dict_round_trip() -> None:
    s = ResumableRandomSampler(10, seed=5, rank=1, world_size=2)
    full = _take(ResumableRandomSampler(10, seed=5, rank=1, world_size=2), 20)
    it = iter(s)
    first = [next(it) for _ in range(8)]
    state = s.state_dict()
    assert (state["consumed"], state["epoch"], state["offset"]) == (8, 1, 7)  # global position 8 * 2 + 1
    s2 = ResumableRandomSampler(10, seed=5, rank=1, world_size=2)
    s2.load_state_dict({"consumed": 8})
    assert first + _take(s2, 12) == full
    with pytest.raises(ValueError, match="world_size"):
        ResumableRandomSampler(10, seed=5, world_size=1).load_state_dict(state)


@pytest.mark.parametrize("n,world_size", [(10, 2), (11, 3), (2, 4)])
def test_ranks_are_disjoint_and_cover_each_epoch(n: int, world_size: int) -> None:
    samplers = [ResumableRandomSampler(n, seed=0, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(3):
        parts = [s.epoch_indices(epoch) for s in samplers]
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(n))  # no padding, no repeats
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("n,world_size", [(10, 2), (11, 3), (2, 4)])
def test_interleaved_ranks_give_the_single_process_stream(n: int, world_size: int) -> None:
    single = _take(ResumableRandomSampler(n, seed=2), 6 * world_size)
    streams = [_take(ResumableRandomSampler(n, seed=2, rank=r, world_size=world_size), 6) for r in range(world_size)]
    assert [streams[g % world_size][g // world_size] for g in range(6 * world_size)] == single


def test_invalid_sampler_arguments() -> None:
    with pytest.raises(ValueError):
        ResumableRandomSampler(0)
    with pytest.raises(ValueError):
        ResumableRandomSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError):
        ResumableRandomSampler(5, start_index=-1)


# ----------------------------------------------------------------------------- loader


class _Synthetic(Dataset):
    """Tiny procedurally drawn images; every 5th one "fails to decode" (None)."""

    def __init__(self, n: int = 23, fail_every: int = 5) -> None:
        self.n, self.fail_every = n, fail_every

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.fail_every and i % self.fail_every == self.fail_every - 1:
            return None
        im = Image.new("RGB", (28, 28), (10 * i % 256, 255 - 7 * i % 256, 3 * i % 256))
        im.paste((255, 255, 255), (i % 20, 2, i % 20 + 8, 12))
        return im, i % 3


def _loader(num_workers: int, start_index: int = 0, dataset: Dataset | None = None, **kw):
    return make_train_loader(
        dataset if dataset is not None else _Synthetic(),
        MultiCropAugmentation(28, 12, local_crops_number=2),
        batch_size=4, num_workers=num_workers, seed=11, start_index=start_index,
        mask_generator=MaskingGenerator(7, max_num_patches=0.5 * 7 * 7), **kw,
    )


def _batches(loader, k: int) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(k)]
    del it  # shuts the workers down
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_batches_identical_across_workers_and_resume() -> None:
    ref = _batches(_loader(0), 8)  # 32 samples: crosses the 23-sample epoch boundary
    for a, b in zip(ref, _batches(_loader(2), 8)):
        _assert_same(a, b)
    for a, b in zip(ref[5:], _batches(_loader(2, start_index=5 * 4), 3)):
        _assert_same(a, b)
    assert torch.equal(torch.cat([b["positions"] for b in ref]), torch.arange(32))
    assert sum(b["n_skipped"] for b in ref[:6]) == 4  # 23 samples: indices 4, 9, 14, 19 fail
    assert all(b["collated_masks"].any() for b in ref)  # masks are drawn
    # Different batches do not repeat their crops / masks.
    assert not torch.equal(ref[0]["collated_masks"], ref[6]["collated_masks"][: len(ref[0]["collated_masks"])])


def test_ranks_get_different_positions_and_data() -> None:
    r0 = _batches(_loader(0, rank=0, world_size=2), 2)
    r1 = _batches(_loader(0, rank=1, world_size=2), 2)
    assert r0[0]["positions"].tolist() == [0, 2, 4, 6] and r1[0]["positions"].tolist() == [1, 3, 5, 7]
    assert not torch.equal(r0[0]["collated_global_crops"], r1[0]["collated_global_crops"])


def test_all_failed_batch_is_empty_with_count() -> None:
    batch = _batches(_loader(0, dataset=_Synthetic(n=5, fail_every=1)), 1)[0]
    assert batch["n_images"] == 0 and batch["n_skipped"] == 4
    assert batch["labels"].shape == (0,) and "collated_global_crops" not in batch


def test_collate_pickles_for_spawned_workers() -> None:
    collate = MultiCropCollate(0, MaskingGenerator(7, max_num_patches=20))
    clone = pickle.loads(pickle.dumps(collate))
    assert clone.mask_generator.get_shape() == (7, 7)


def test_derive_seed_is_stable() -> None:
    assert derive_seed(0, 1, 0) == derive_seed(0, 1, 0) < 2**63
    assert len({derive_seed(0, 1, p) for p in range(1000)}) == 1000
