"""Datasets and robust decoding: every odd file turns into RGB or a counted, named skip."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.datasets import (
    DatasetError,
    FashionMNIST,
    FileListDataset,
    ImageDecodeWarning,
    ImageFolderDataset,
    MultiCropDataset,
    load_image,
)
from dinokit.data.loader import make_train_loader
from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import MultiCropAugmentation


def _rgb(path: Path, size: int = 16, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value // 2, 255 - value)).save(path)
    return path


def _odd_files(folder: Path) -> dict[str, Path]:
    """One file per decoding case; the keys say what each should become."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["rgb_ok"] = _rgb(folder / "rgb.png")
    files["cmyk_ok"] = folder / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(files["cmyk_ok"])  # pure red in CMYK
    files["i16_ok"] = folder / "gray16.png"
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(files["i16_ok"])
    files["palette_ok"] = folder / "palette.png"
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(files["palette_ok"], transparency=0)  # index 0 (black) is transparent
    files["rgba_ok"] = folder / "rgba.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(files["rgba_ok"])  # fully transparent black
    files["la_ok"] = folder / "la.png"
    Image.new("LA", (16, 16), (50, 255)).save(files["la_ok"])
    files["empty_bad"] = folder / "empty.jpg"
    files["empty_bad"].write_bytes(b"")
    files["text_bad"] = folder / "notes.png"
    files["text_bad"].write_text("this is not an image")
    files["truncated_bad"] = folder / "truncated.jpg"
    noise = np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(files["truncated_bad"], quality=95)
    data = files["truncated_bad"].read_bytes()
    files["truncated_bad"].write_bytes(data[: len(data) // 2])
    return files


# ----------------------------------------------------------------------------- load_image


def test_load_image_converts_odd_modes_to_rgb(tmp_path: Path) -> None:
    files = _odd_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of the convertible files may warn
        images = {k: load_image(p) for k, p in files.items() if k.endswith("_ok")}
    assert all(im is not None and im.mode == "RGB" and im.size == (16, 16) for im in images.values())
    assert images["i16_ok"].getpixel((3, 3)) == (255, 255, 255)  # scaled, 65535 -> 255
    assert images["rgba_ok"].getpixel((3, 3)) == (255, 255, 255)  # transparent -> white, not black
    assert images["palette_ok"].getpixel((3, 3)) == (255, 255, 255)  # transparent index -> white
    assert images["palette_ok"].getpixel((0, 0)) == (0, 255, 0)
    assert images["la_ok"].getpixel((3, 3)) == (50, 50, 50)
    r, g, b = images["cmyk_ok"].getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60


def test_load_image_scales_16_bit_mid_gray(tmp_path: Path) -> None:
    path = tmp_path / "mid16.png"
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(path)  # 32896 / 257 = 128
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 cw to display", as phones store portrait photos
    Image.new("RGB", (6, 4)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (4, 6)
    assert load_image(tmp_path / "phone.jpg", exif_transpose=False).size == (6, 4)


@pytest.mark.parametrize("key", ["empty_bad", "text_bad", "truncated_bad"])
def test_load_image_skips_bad_files_with_named_warning(tmp_path: Path, key: str) -> None:
    path = _odd_files(tmp_path)[key]
    with pytest.warns(ImageDecodeWarning, match=path.name):
        assert load_image(path) is None


def test_load_image_skips_huge_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _rgb(tmp_path / "big.png", size=40)
    with pytest.warns(ImageDecodeWarning, match="max_pixels"):
        assert load_image(path, max_pixels=1000) is None
    # PIL's own decompression-bomb error (above 2 x MAX_IMAGE_PIXELS) is a skip too, not a crash.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.warns(ImageDecodeWarning, match="big.png"):
        assert load_image(path, max_pixels=None) is None


# ----------------------------------------------------------------------------- ImageFolderDataset


def test_image_folder_labels_from_sorted_subfolders(tmp_path: Path) -> None:
    for rel in ["dog/b.png", "dog/a.JPG", "cat/x/deep.png", "cat/z.png", "cat/.hidden.png", ".git/q.png"]:
        _rgb(tmp_path / rel)
    (tmp_path / "cat" / "readme.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    rel = [os.path.relpath(ds.path(i), tmp_path) for i in range(len(ds))]
    assert rel == [os.path.join("cat", "x", "deep.png"), os.path.join("cat", "z.png"),
                   os.path.join("dog", "a.JPG"), os.path.join("dog", "b.png")]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    image, label = ds[2]
    assert image.mode == "RGB" and label == 1


def test_image_folder_unlabeled_when_an_image_sits_at_the_root(tmp_path: Path) -> None:
    _rgb(tmp_path / "top.png")
    _rgb(tmp_path / "sub" / "a.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and [ds[i][1] for i in range(len(ds))] == [-1, -1]


def test_image_folder_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="nope"):
        ImageFolderDataset(missing)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):  # DatasetError is a ValueError
        ImageFolderDataset(tmp_path / "empty")


def test_image_folder_bad_file_gives_none(tmp_path: Path) -> None:
    files = _odd_files(tmp_path / "imgs")
    ds = ImageFolderDataset(tmp_path / "imgs")
    with pytest.warns(ImageDecodeWarning):
        items = [ds[i] for i in range(len(ds))]
    bad = {os.path.basename(ds.path(i)) for i, it in enumerate(items) if it is None}
    assert bad == {p.name for k, p in files.items() if k.endswith("_bad")}


# ----------------------------------------------------------------------------- FileListDataset


def test_file_list_paths_labels_comments(tmp_path: Path) -> None:
    _rgb(tmp_path / "lists" / "imgs" / "a.png")
    _rgb(tmp_path / "other" / "b.png")
    absolute = _rgb(tmp_path / "abs.png")
    list_file = tmp_path / "lists" / "train.txt"
    list_file.write_text(f"# header\n\nimgs/a.png\t3\n{absolute}\n  \n")
    ds = FileListDataset(list_file)
    assert len(ds) == 2 and ds.labels.tolist() == [3, -1]
    assert ds[0][1] == 3 and ds[1][0].mode == "RGB"
    ds_root = FileListDataset(_write(tmp_path / "l2.txt", "b.png\t1\n"), root=tmp_path / "other")
    assert ds_root[0][1] == 1


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_file_list_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing.txt"):
        FileListDataset(tmp_path / "missing.txt")
    with pytest.raises(DatasetError, match="line 2"):
        FileListDataset(_write(tmp_path / "bad.txt", "a.png\t1\nb.png\tcat\n"))
    with pytest.raises(DatasetError, match="only_comments.txt"):
        FileListDataset(_write(tmp_path / "only_comments.txt", "# nothing\n\n"))


# ----------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, magic: int, array: np.ndarray, gz: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def _fake_fashion(folder: Path, n: int = 5, prefix: str = "t10k") -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 256
    _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 0x803, images)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 0x801, np.arange(n) % 10)
    return images


def test_fashion_mnist_reads_gzipped_idx(tmp_path: Path) -> None:
    images = _fake_fashion(tmp_path, n=5)
    ds = FashionMNIST(tmp_path, split="test")
    assert len(ds) == 5 and ds.data.shape == (5, 28, 28)
    image, label = ds[3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 3
    assert np.array_equal(np.asarray(image)[..., 0], images[3])


def test_fashion_mnist_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "absent")
    _fake_fashion(tmp_path, n=5)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz.*dataset-fashion-mnist"):
        FashionMNIST(tmp_path, split="train")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x803, np.arange(5))  # wrong magic
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz.*magic"):
        FashionMNIST(tmp_path, split="test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, np.arange(4))  # 4 labels, 5 images
    with pytest.raises(DatasetError, match="5 images but 4 labels"):
        FashionMNIST(tmp_path, split="test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz.*corrupt"):
        FashionMNIST(tmp_path, split="test")
    raw = gzip.compress((0x803).to_bytes(4, "big") + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 10)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(raw)  # header says 2 images, data is short
    with pytest.raises(DatasetError, match="header"):
        FashionMNIST(tmp_path, split="test")


@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_test_split() -> None:
    ds = FashionMNIST(split="test")
    assert len(ds) == 10_000 and np.bincount(ds.targets).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- MultiCropDataset


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        return None if i == 1 else (Image.new("RGB", (20, 20), (i * 40, 90, 200)), i)


def test_multicrop_dataset_passes_none_and_seeds_plain_transforms() -> None:
    def plain(image):  # a transform on torch's global RNG, without a generator argument
        return {"global_crops": [torch.rand(3)], "local_crops": []}

    ds = MultiCropDataset(_Images(), plain)
    assert ds[1] is None
    before = torch.get_rng_state()
    a = ds.get(0, generator=torch.Generator().manual_seed(5))
    b = ds.get(0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0]["global_crops"][0], b[0]["global_crops"][0]) and a[1] == 0
    assert torch.equal(before, torch.get_rng_state())  # the caller's global stream is untouched


def test_loader_counts_skipped_files_across_workers(tmp_path: Path) -> None:
    files = _odd_files(tmp_path / "imgs")
    n_bad = sum(k.endswith("_bad") for k in files)
    ds = ImageFolderDataset(tmp_path / "imgs")  # 9 files, 3 undecodable
    loader = make_train_loader(
        ds, MultiCropAugmentation(16, 8, local_crops_number=2), batch_size=3, num_workers=2, seed=0,
        mask_generator=MaskingGenerator(4, max_num_patches=8),
    )
    it = iter(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        batches = [next(it) for _ in range(3)]  # one epoch: 9 samples
    del it
    assert sum(b["n_skipped"] for b in batches) == n_bad
    assert sum(b["n_images"] for b in batches) == len(ds) - n_bad
    for b in batches:
        assert b["n_images"] + b["n_skipped"] == 3 and len(b["labels"]) == b["n_images"]
        if b["n_images"]:
            assert b["collated_global_crops"].shape == (2 * b["n_images"], 3, 16, 16)
            assert b["collated_masks"].shape == (2 * b["n_images"], 16)
