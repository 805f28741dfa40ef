"""Dense and retrieval evaluation: known answers, metrics against slow references, bad input."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main as cli_main
from dinokit.eval.dense import (
    CHUNK,
    confusion_matrix,
    dense_features,
    depth_metrics,
    evaluate_depth,
    evaluate_segmentation,
    segmentation_metrics,
)
from dinokit.eval.dense_data import IGNORE_INDEX, DenseDataError, open_dense_set, read_mask
from dinokit.eval.retrieval import evaluate_retrieval, retrieval_metrics
from dinokit.models.vision_transformer import VisionTransformer

COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def _quadrant_set(root: Path, n: int, seed: int, shuffle_masks: bool = False, size: int = 56) -> Path:
    """Images of 4 quadrants (each 2 x 2 patches of 14 px), quadrant colour = its class; with
    `shuffle_masks` every image gets another image's mask (labels independent of pixels)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = []
    half = size // 2
    for i in range(n):
        classes = rng.integers(0, 4, 4)
        mask = np.zeros((size, size), np.uint8)
        for q, c in enumerate(classes):
            mask[(q // 2) * half:(q // 2 + 1) * half, (q % 2) * half:(q % 2 + 1) * half] = c
        image = COLOURS[mask].astype(np.int16) + rng.integers(-20, 20, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        masks.append(mask)
    if shuffle_masks:
        masks = [masks[j] for j in rng.permutation(n)]
    for i, mask in enumerate(masks):
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


def _depth_set(root: Path, n: int, seed: int, size: int = 28) -> Path:
    """Uniform images of one of 4 colours, depth 1 + colour index metres (16-bit mm): separable."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    for i in range(n):
        c = int(rng.integers(0, 4))
        image = np.clip(COLOURS[c].astype(np.int16) + rng.integers(-10, 10, (size, size, 3)), 0, 255)
        depth = np.full((size, size), 1.0 + c, np.float32)
        depth[0, 0] = 0  # one pixel without measurement: never counted
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(root / "depth" / f"{i:03d}.png")
    return root


# ----------------------------------------------------------------------------- known answers


def test_segmentation_probe_separable_scenes_near_perfect_and_chance_on_shuffled(tmp_path: Path) -> None:
    train = _quadrant_set(tmp_path / "train", 40, 0)
    test = _quadrant_set(tmp_path / "test", 12, 1)
    good = evaluate_segmentation("pixels", train, test, epochs=30, lr=1e-2).result
    assert good["num_classes"] == 4 and good["num_classes_from"].startswith("train masks")
    assert good["miou"] > 0.97, good["per_class_iou"]
    assert good["pixel_accuracy"] > 0.98

    shuffled = _quadrant_set(tmp_path / "train_shuffled", 40, 0, shuffle_masks=True)
    bad = evaluate_segmentation("pixels", shuffled, test, epochs=30, lr=1e-2).result
    assert bad["miou"] < 0.35, bad["per_class_iou"]  # chance: about 1/7 for 4 balanced classes


def test_depth_probe_learns_separable_depths_and_not_shuffled_maps(tmp_path: Path) -> None:
    train = _depth_set(tmp_path / "train", 48, 0)
    test = _depth_set(tmp_path / "test", 12, 1)
    good = evaluate_depth("pixels", train, test, epochs=40, lr=1e-2, max_depth=4.5)
    assert good["delta1"] > 0.95 and good["abs_rel"] < 0.08, good
    assert good["n_evaluated"] == 12 and good["no_valid_depth"] == []
    # Same images, each with another image's depth: nothing to learn.
    rng = np.random.default_rng(3)
    files = sorted((train / "depth").glob("*.png"))
    maps = [np.array(Image.open(f)) for f in files]
    for f, j in zip(files, rng.permutation(len(files))):
        Image.fromarray(maps[j]).save(f)
    bad = evaluate_depth("pixels", train, test, epochs=40, lr=1e-2, max_depth=4.5)
    assert bad["rmse"] > 2 * good["rmse"]


# ----------------------------------------------------------------------------- metrics vs slow references


def _slow_miou(pred: np.ndarray, gt: np.ndarray, k: int) -> tuple[float, float, list[float | None]]:
    ious: list[float | None] = []
    correct = total = 0
    for y, x in np.ndindex(gt.shape):
        if gt[y, x] != IGNORE_INDEX:
            total += 1
            correct += int(pred[y, x] == gt[y, x])
    for c in range(k):
        inter = union = 0
        for y, x in np.ndindex(gt.shape):
            if gt[y, x] == IGNORE_INDEX:
                continue
            p, g = pred[y, x] == c, gt[y, x] == c
            inter += int(p and g)
            union += int(p or g)
        ious.append(inter / union if union else None)
    present = [v for v in ious if v is not None]
    return sum(present) / len(present), correct / total, ious


def test_segmentation_metrics_equal_a_slow_reference_and_ignore_never_counts() -> None:
    rng = np.random.default_rng(0)
    k = 5
    gt = rng.integers(0, k - 1, (23, 17)).astype(np.uint8)  # class 4 never labelled...
    gt[rng.random(gt.shape) < 0.2] = IGNORE_INDEX
    pred = rng.integers(0, k, gt.shape).astype(np.uint8)  # ...but predicted: IoU 0, counted
    m = segmentation_metrics(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k))
    miou, acc, ious = _slow_miou(pred, gt, k)
    assert m["miou"] == pytest.approx(miou, abs=1e-12)
    assert m["pixel_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert m["per_class_iou"] == pytest.approx(ious, abs=1e-6)
    assert m["n_pixels"] == int((gt != IGNORE_INDEX).sum())
    changed = pred.copy()
    changed[gt == IGNORE_INDEX] = (changed[gt == IGNORE_INDEX] + 1) % k
    assert segmentation_metrics(confusion_matrix(torch.from_numpy(changed), torch.from_numpy(gt), k)) == m


def test_depth_metrics_equal_a_slow_reference() -> None:
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.5, 12, (9, 11)).astype(np.float32)
    gt[rng.random(gt.shape) < 0.2] = 0  # no measurement
    pred = rng.uniform(0.01, 15, gt.shape).astype(np.float32)
    lo, hi = 1e-3, 10.0
    se, rel, good, n = 0.0, 0.0, 0, 0
    for y, x in np.ndindex(gt.shape):
        g = float(gt[y, x])
        if not lo < g <= hi:
            continue
        p = min(max(float(pred[y, x]), lo), hi)
        se += (p - g) ** 2
        rel += abs(p - g) / g
        good += max(p / g, g / p) < 1.25
        n += 1
    m = depth_metrics(pred, gt, lo, hi)
    assert m is not None
    assert m["rmse"] == pytest.approx((se / n) ** 0.5, rel=1e-9)
    assert m["abs_rel"] == pytest.approx(rel / n, rel=1e-9)
    assert m["delta1"] == pytest.approx(good / n, rel=1e-9)
    assert depth_metrics(pred, np.zeros_like(gt), lo, hi) is None


def _slow_retrieval(q: np.ndarray, ql: np.ndarray, g: np.ndarray, gl: np.ndarray, ks: tuple[int, ...],
                    loo: bool) -> dict[str, float]:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps, recalls = [], {k: [] for k in ks}
    for i in range(len(q)):
        candidates = [j for j in range(len(g)) if not (loo and j == i)]
        ranked = sorted(candidates, key=lambda j: -float(q[i] @ g[j]))
        rel = [gl[j] == ql[i] for j in ranked]
        if not any(rel):
            continue
        hits, precisions = 0, []
        for r, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                precisions.append(hits / r)
        aps.append(sum(precisions) / sum(rel))
        for k in ks:
            recalls[k].append(float(any(rel[:k])))
    return {"map": float(np.mean(aps)), **{f"recall@{k}": float(np.mean(v)) for k, v in recalls.items()},
            "n_queries": len(aps)}


@pytest.mark.parametrize("loo", [False, True])
def test_retrieval_metrics_equal_a_slow_reference_in_any_chunking(loo: bool) -> None:
    rng = np.random.default_rng(2)
    g, gl = rng.normal(size=(40, 6)), rng.integers(0, 4, 40)
    gl[0] = 9  # a class of one: no relevant image when it queries itself (leave-one-out)
    q, ql = (g, gl) if loo else (rng.normal(size=(15, 6)), np.append(rng.integers(0, 4, 14), 7))
    ref = _slow_retrieval(q, ql, g, gl, (1, 5), loo)
    for max_elements in (1, 97, 1 << 20):  # one query per chunk, uneven chunks, all at once
        m = retrieval_metrics(torch.tensor(q), torch.tensor(ql), torch.tensor(g), torch.tensor(gl), (1, 5),
                              leave_one_out=loo, max_elements=max_elements)
        assert m["map"] == pytest.approx(ref["map"], abs=1e-6)
        assert m["recall@1"] == pytest.approx(ref["recall@1"]) and m["recall@5"] == pytest.approx(ref["recall@5"])
        assert m["n_queries"] == ref["n_queries"] and m["n_without_relevant"] == 1


def test_retrieval_of_class_folders_finds_same_coloured_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c, colour in enumerate(COLOURS[1:]):
        folder = tmp_path / "gallery" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(5):
            image = colour.astype(np.int16) + rng.integers(-30, 30, (20, 20, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "gallery" / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="broken.png"):
        result = evaluate_retrieval("pixels:16", tmp_path / "gallery", features=["cls", "gem"], progress=False)
    assert result["results"]["cls"]["map"] == pytest.approx(1.0)
    assert result["results"]["cls"]["n_queries"] == 15
    assert result["gallery"]["n_skipped"] == 1 and result["query"].startswith("leave-one-out")


# ----------------------------------------------------------------------------- caching


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2).eval()


def test_feature_cache_resumes_after_an_interruption(tmp_path: Path) -> None:
    data = _quadrant_set(tmp_path / "data", CHUNK + 5, 0, size=28)
    dense = open_dense_set(data, "segment")
    model = _tiny_vit()
    reference = dense_features(model, dense, 28, layers=2)

    def stop(chunk: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dense_features(model, dense, 28, layers=2, cache_dir=tmp_path / "cache", on_chunk=stop)
    calls = []
    original = model.get_intermediate_layers
    model.get_intermediate_layers = lambda x, **kw: calls.append(len(x)) or original(x, **kw)  # type: ignore[method-assign]
    resumed = dense_features(model, dense, 28, layers=2, cache_dir=tmp_path / "cache", batch_size=8)
    assert sum(calls) == 5  # only the second chunk was computed
    assert torch.equal(resumed.features, reference.features) and resumed.kept == reference.kept
    calls.clear()
    again = dense_features(model, dense, 28, layers=2, cache_dir=tmp_path / "cache")
    assert calls == [] and torch.equal(again.features, reference.features)
    # Other weights never reuse these features.
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    dense_features(model, dense, 28, layers=2, cache_dir=tmp_path / "cache")
    assert sum(calls) == CHUNK + 5


# ----------------------------------------------------------------------------- bad input


def test_pairing_errors_name_the_files(tmp_path: Path) -> None:
    data = _quadrant_set(tmp_path / "d", 3, 0)
    (data / "masks" / "001.png").unlink()
    with pytest.raises(DenseDataError, match=r"1 image\(s\) in .*images without a file in .*masks \(first: 001\)"):
        open_dense_set(data, "segment")
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(data / "masks" / "001.png")
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(data / "masks" / "extra.png")
    with pytest.raises(DenseDataError, match=r"without an image .*first: extra"):
        open_dense_set(data, "segment")


def test_label_errors_name_the_file_and_bad_images_are_counted(tmp_path: Path) -> None:
    train = _quadrant_set(tmp_path / "train", 6, 0)
    test = _quadrant_set(tmp_path / "test", 4, 1)
    Image.fromarray(np.zeros((30, 56), np.uint8)).save(test / "masks" / "002.png")
    with pytest.raises(DenseDataError, match=r"002.png: mask is 56x30 but its image is 56x56"):
        evaluate_segmentation("pixels", train, test, epochs=1)
    Image.fromarray(np.full((56, 56), 7, np.uint8)).save(test / "masks" / "002.png")
    with pytest.raises(DenseDataError, match=r"002.png: class index 7 but there are 4 classes"):
        evaluate_segmentation("pixels", train, test, epochs=1)
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(test / "masks" / "002.png")
    (test / "images" / "003.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="003.png"):
        result = evaluate_segmentation("pixels", train, test, epochs=1).result
    assert result["test"]["n"] == 3 and result["test"]["skipped"] == ["003.png"]
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(test / "masks" / "001.png")
    with pytest.raises(DenseDataError, match=r"001.png: a mask must be a single-channel PNG"), pytest.warns(UserWarning):
        evaluate_segmentation("pixels", train, test, epochs=1)


def test_unreadable_depth_png_is_an_error_naming_it(tmp_path: Path) -> None:
    train = _depth_set(tmp_path / "train", 4, 0)
    test = _depth_set(tmp_path / "test", 2, 1)
    (test / "depth" / "001.png").write_bytes(b"garbage")
    with pytest.raises(DenseDataError, match=r"001.png: cannot read the depth PNG"):
        evaluate_depth("pixels", train, test, epochs=1)


def test_voc_and_ade20k_layouts(tmp_path: Path) -> None:
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    mask = Image.fromarray(np.array([[0, 15], [255, 20]], np.uint8), mode="L").convert("P")
    mask.putpalette([v for c in range(256) for v in (c, c, c)])
    for stem in ("2007_000032", "2007_000039"):
        Image.new("RGB", (2, 2)).save(voc / "JPEGImages" / f"{stem}.jpg")
        mask.save(voc / "SegmentationClass" / f"{stem}.png")
    Image.new("RGB", (2, 2)).save(voc / "JPEGImages" / "unlabelled.jpg")  # VOC ships unlabelled images
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n")
    dense = open_dense_set(f"{voc}:val", "segment")
    assert dense.layout == "voc" and dense.num_classes == 21 and [p.stem for p in dense.images] == ["2007_000039"]
    assert read_mask(dense.labels[0], (2, 2)).tolist() == [[0, 15], [255, 20]]

    ade = tmp_path / "ADEChallengeData2016"
    (ade / "images" / "validation").mkdir(parents=True)
    (ade / "annotations" / "validation").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(ade / "images" / "validation" / "ADE_val_1.jpg")
    Image.fromarray(np.array([[0, 1], [150, 3]], np.uint8)).save(ade / "annotations" / "validation" / "ADE_val_1.png")
    dense = open_dense_set(f"{ade}:validation", "segment")
    assert dense.layout == "ade20k" and dense.num_classes == 150
    assert read_mask(dense.labels[0], (2, 2), dense.reduce_zero_label).tolist() == [[255, 0], [149, 2]]


# ----------------------------------------------------------------------------- command line, pictures, scenes


def test_cli_segment_depth_retrieval_and_viz_write_json(tmp_path: Path) -> None:
    seg_train = _quadrant_set(tmp_path / "st", 8, 0)
    seg_test = _quadrant_set(tmp_path / "se", 3, 1)
    out = tmp_path / "seg.json"
    assert cli_main(["eval", "segment", "pixels", "--train", str(seg_train), "--test", str(seg_test), "--epochs", "2",
                     "--scales", "1", "2", "--flip", "--no-progress", "--out", str(out)]) == 0
    seg = json.loads(out.read_text())
    assert 0 <= seg["miou"] <= 1 and seg["scales"] == [1.0, 2.0] and seg["flip"] is True

    d_train, d_test = _depth_set(tmp_path / "dt", 6, 0), _depth_set(tmp_path / "de", 2, 1)
    out = tmp_path / "depth.json"
    assert cli_main(["eval", "depth", "pixels", "--train", str(d_train), "--test", str(d_test), "--epochs", "1",
                     "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["max_depth"] == pytest.approx(3.999, abs=0.01)

    gallery = tmp_path / "gallery"
    for c in range(2):
        (gallery / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 100 * c + i, np.uint8)).save(gallery / f"c{c}" / f"{i}.png")
    out = tmp_path / "retrieval.json"
    assert cli_main(["eval", "retrieval", "pixels", "--gallery", str(gallery), "--query", str(gallery),
                     "--ks", "1", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["cls"]["recall@1"] == 1.0  # each image finds itself

    pics = tmp_path / "pics"
    assert cli_main(["viz", "segment", "pixels", "--train", str(seg_train), "--test", str(seg_test), "--epochs", "1",
                     "--n", "2", "--no-progress", "--out", str(pics)]) == 0
    assert Image.open(pics / "segment.png").size[1] > 2 * 160
    assert json.loads((pics / "segment.json").read_text())["picture"] == "segment.png"
    assert cli_main(["eval", "segment", "pixels", "--train", str(tmp_path / "nope"), "--test", str(seg_test)]) == 2


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def test_constructed_scene_set(tmp_path: Path) -> None:
    from dinokit.scenes import write_scene_set

    rng = np.random.default_rng(0)
    fm = tmp_path / "fm"
    fm.mkdir()
    yy, xx = np.mgrid[0:28, 0:28]
    blob = ((yy - 14) ** 2 + (xx - 14) ** 2 < 100).astype(np.uint8) * 255  # a disc: solid garment pixels
    for prefix, n in (("train", 50), ("t10k", 80)):
        _write_idx(fm, prefix, np.repeat(blob[None], n, 0), rng.integers(0, 10, n))
    out = tmp_path / "scenes"
    desc = write_scene_set(out, n_train=6, n_test=3, size=56, n_gallery=2, n_query=1, fmnist_root=str(fm))
    assert desc["constructed"] is True and "opacity" in desc["construction"]
    for split, n in (("train", 6), ("test", 3)):
        dense = open_dense_set(out / split, "segment")
        assert len(dense) == n
        for image, label in zip(dense.images, dense.labels):
            mask = read_mask(label, Image.open(image).size)
            assert set(np.unique(mask).tolist()) <= {0, 255, *range(1, 11)} and (mask > 0).any()
            depth = np.array(Image.open(out / split / "depth" / label.name)) / 1000
            assert depth.min() >= 1.3 and depth.max() <= 6.0
            assert np.all((depth[(mask > 0) & (mask < 255)] <= 2.67))  # garments are nearer than the floor
    assert len(list((out / "retrieval" / "gallery").rglob("*.png"))) <= 20
    with pytest.raises(FileExistsError):
        write_scene_set(out, fmnist_root=str(fm))
