"""Evaluation: k-NN, linear probe, logistic regression, feature extraction / shards, CLI."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data.datasets import ImageDecodeWarning, ImageFolderDataset
from dinokit.eval import (
    PixelBackbone,
    PreprocessedImages,
    add_commands,
    eval_transform_for,
    evaluate_knn,
    evaluate_linear,
    extract_features,
    few_shot_indices,
    iter_feature_shards,
    knn_classify,
    linear_probe,
    read_features,
    split_features,
    write_feature_shards,
)
from dinokit.eval.embed import parse_feature_kind
from dinokit.eval.knn import topk_neighbors
from dinokit.models import vit_args


def clusters(n_per_class: int, num_classes: int, dim: int = 16, seed: int = 0, spread: float = 8.0):
    """Gaussian blobs far apart: (features (n*C, dim), labels (n*C,))."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * spread
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + torch.randn(len(labels), dim, generator=g)
    return feats, labels


def separable(num_classes: int = 6):
    torch.manual_seed(0)
    train_x, train_y = clusters(60, num_classes, seed=1)
    # Same centres (seed 1), fresh noise: draw more and keep the tail.
    all_x, all_y = clusters(90, num_classes, seed=1)
    keep = torch.arange(len(all_y)) % 90 >= 60
    return train_x, train_y, all_x[keep], all_y[keep]


def reference_knn(train_x, train_y, test_x, test_y, ks, temperature=0.07):
    """Unchunked: full similarity matrix, the official DINO code's computation."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    out = {}
    for k in ks:
        k = min(k, len(train_y))
        s, i = sims.topk(k, dim=1)
        one_hot = F.one_hot(train_y[i], num_classes).float()
        probs = (one_hot * (s / temperature).exp()[..., None]).sum(1)
        top = probs.topk(min(5, num_classes), dim=1).indices
        out[k] = (100.0 * int((top[:, 0] == test_y).sum()) / len(test_y),
                  100.0 * int((top == test_y[:, None]).any(1).sum()) / len(test_y))
    return out


# ----------------------------------------------------------------------------- k-NN


def test_knn_separable_clusters_all_correct():
    train_x, train_y, test_x, test_y = separable()
    res = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20, 100, 200))
    for k, r in res.items():
        assert r["top1"] == 100.0 and r["top5"] == 100.0, (k, r)
    assert res[200]["k_used"] == 200


def test_knn_shuffled_labels_is_chance():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 16, generator=g)
    y = torch.randint(0, 4, (2000,), generator=g)
    res = knn_classify(x[:1600], y[:1600], x[1600:], y[1600:], ks=(20,))
    assert "top5" not in res[20]  # 4 classes: no top-5
    assert abs(res[20]["top1"] - 25.0) < 8.0  # 400 test samples: std ~2.2 %


@pytest.mark.parametrize("chunk,train_chunk", [(1, 7), (7, 33), (64, 1), (1000, 100000), (13, 50)])
def test_knn_chunked_equals_unchunked(chunk, train_chunk):
    g = torch.Generator().manual_seed(5)
    train_x, train_y = torch.randn(300, 24, generator=g), torch.randint(0, 7, (300,), generator=g)
    test_x, test_y = torch.randn(90, 24, generator=g), torch.randint(0, 7, (90,), generator=g)
    ks = (1, 5, 20, 100)
    res = knn_classify(train_x, train_y, test_x, test_y, ks=ks, chunk_size=chunk, train_chunk_size=train_chunk)
    ref = reference_knn(train_x, train_y, test_x, test_y, ks)
    for k in ks:
        assert (res[k]["top1"], res[k]["top5"]) == ref[k]
    # The neighbours themselves, not only the accuracies.
    s, i = topk_neighbors(train_x, test_x, 100, chunk, train_chunk)
    ref_s, ref_i = (F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T).topk(100, dim=1)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=1e-6)


def test_knn_k_clamped_and_unlabelled_rejected():
    train_x, train_y, test_x, test_y = separable()
    res = knn_classify(train_x[:30], train_y[:30], test_x, test_y, ks=(10, 1000))
    assert res[1000]["k_used"] == 30
    with pytest.raises(ValueError, match="labels"):
        knn_classify(train_x, torch.full_like(train_y, -1), test_x, test_y)


def test_few_shot_picks_n_per_class():
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 12)
    idx = few_shot_indices(y, 3, seed=0)
    assert torch.bincount(y[idx]).tolist() == [3, 3, 3]
    assert torch.equal(idx, few_shot_indices(y, 3, seed=0))  # seeded
    assert not torch.equal(idx, few_shot_indices(y, 3, seed=1))
    with pytest.warns(UserWarning, match="fewer"):
        assert torch.bincount(y[few_shot_indices(y, 8)]).tolist() == [8, 7, 8]
    train_x, train_y, test_x, test_y = separable()
    res = knn_classify(train_x, train_y, test_x, test_y, ks=(5, 20), few_shot=2)
    assert res[20]["k_used"] == 12 and res[5]["top1"] == 100.0  # 6 classes x 2 shots


# ----------------------------------------------------------------------------- linear / logreg


def test_linear_probe_separable_and_deterministic():
    train_x, train_y, test_x, test_y = separable()
    feats = {"a": train_x, "b": train_x[:, :8]}
    test = {"a": test_x, "b": test_x[:, :8]}
    res = linear_probe(feats, train_y, test, test_y, lrs=[0.01, 0.1], epochs=10, batch_size=64, seed=0)
    assert res["best"]["test_top1"] == 100.0 and res["best"]["val_top1"] == 100.0
    assert res["n_val"] == 36 and res["n_train"] == 324
    assert len(res["grid"]) == 4 and set(res["per_feature"]) == {"a", "b"}
    again = linear_probe(feats, train_y, test, test_y, lrs=[0.01, 0.1], epochs=10, batch_size=64, seed=0)
    assert again == res


def test_stacked_classifiers_score_each_learning_rate_separately():
    """All (L, C, D) classifiers in one GEMM: logits and accuracies of classifier l are those of
    W[l], b[l] alone."""
    from dinokit.eval.linear import _accuracy, _logits

    g = torch.Generator().manual_seed(2)
    x, W, b = torch.randn(50, 6, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    logits = _logits(x, W, b)
    acc = _accuracy({"f": (W, b)}, {"f": x}, y, torch.device("cpu"), batch_size=16)["f"][0]
    for l in range(3):
        torch.testing.assert_close(logits[:, l], x @ W[l].T + b[l])
        assert float(acc[l]) == pytest.approx(100.0 * float(((x @ W[l].T + b[l]).argmax(1) == y).float().mean()))
    assert len(set(acc.tolist())) > 1  # the classifiers differ, so a mix-up would show


def test_linear_probe_shuffled_labels_is_chance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2400, 16, generator=g)
    y = torch.randint(0, 4, (2400,), generator=g)
    res = linear_probe({"cls": x[:2000]}, y[:2000], {"cls": x[2000:]}, y[2000:], lrs=[0.01, 0.1], epochs=3)
    assert abs(res["best"]["test_top1"] - 25.0) < 8.0


def test_logreg_separable_and_chance():
    pytest.importorskip("sklearn")
    from dinokit.eval.logreg import logreg_probe

    train_x, train_y, test_x, test_y = separable()
    res = logreg_probe(train_x, train_y, test_x, test_y, cs=(0.01, 1.0))
    assert res["best"]["test_top1"] == 100.0 and res["best"]["test_top5"] == 100.0
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(1400, 16, generator=g), torch.randint(0, 4, (1400,), generator=g)
    res = logreg_probe(x[:1000], y[:1000], x[1000:], y[1000:], cs=(0.01, 1.0))
    assert abs(res["best"]["test_top1"] - 25.0) < 8.0


# ----------------------------------------------------------------------------- features


def _colour_folder(root: Path, seed: int) -> Path:
    """2 classes x 6 images (reddish vs bluish 16 px noise) + 1 corrupt file in class b."""
    rng = np.random.default_rng(seed)
    for name, base in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        (root / name).mkdir(parents=True)
        for i in range(6):
            arr = np.clip(np.array(base) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    (root / "b" / "2_broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return _colour_folder(tmp_path, seed=0)


@pytest.fixture
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other images of the same two classes: accuracy is measured on these, never on the train set."""
    return _colour_folder(tmp_path_factory.mktemp("held_out"), seed=1)


def tiny_vit():
    torch.manual_seed(0)
    return vit_args("vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16).build().eval()


def test_feature_kind_names():
    assert parse_feature_kind("cls_lastN", 3) == ("cls_last3", 3, False)
    assert parse_feature_kind("cls_last1_avgpool") == ("cls_last1_avgpool", 1, True)
    with pytest.raises(ValueError):
        parse_feature_kind("mean")


def test_shards_equal_direct_forward(image_folder: Path, tmp_path: Path):
    model = tiny_vit()
    ds = ImageFolderDataset(image_folder)
    transform = eval_transform_for(16)
    assert (transform.resize, transform.crop) == (18, 16)
    broken = next(i for i in range(len(ds)) if ds.path(i).endswith("2_broken.png"))
    kinds = ("cls", "avgpool", "cls_lastN", "cls_lastN_avgpool")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        manifest = write_feature_shards(tmp_path / "feats", model, ds, transform, features=kinds, shard_size=5,
                                        dtype="float32", source="tiny", batch_size=4, n_last_blocks=2, progress=False)
        ex = extract_features(model, ds, transform, batch_size=3, features=kinds, n_last_blocks=2, progress=False)
    assert manifest["skipped"] == [broken] and ex.skipped == [broken]
    assert manifest["n_rows"] == 12 and [s["rows"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["features"] == {"cls": {"dim": 32}, "avgpool": {"dim": 32}, "cls_last2": {"dim": 64},
                                    "cls_last2_avgpool": {"dim": 96}}
    assert all(len(s["labels"]) <= 5 for s in iter_feature_shards(tmp_path / "feats"))

    stored = read_features(tmp_path / "feats")
    kept = [i for i in range(len(ds)) if i != broken]
    x = torch.stack([transform(ds[i][0]) for i in kept])
    with torch.no_grad():
        direct = model.forward_features(x)
        blocks = model.get_intermediate_layers(x, n=2, return_class_token=True)
    expected = {
        "cls": direct["x_norm_clstoken"],
        "avgpool": direct["x_norm_patchtokens"].mean(1),
        "cls_last2": torch.cat([blocks[0][1], blocks[1][1]], dim=1),
        "cls_last2_avgpool": torch.cat([blocks[0][1], blocks[1][1], direct["x_norm_patchtokens"].mean(1)], dim=1),
    }
    for name, want in expected.items():
        torch.testing.assert_close(stored["features"][name], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ex.features[name], want, rtol=1e-5, atol=1e-5)
    assert stored["labels"].tolist() == [int(ds.labels[i]) for i in kept] == ex.labels.tolist()
    assert stored["indices"].tolist() == kept
    with pytest.raises(FileExistsError):
        write_feature_shards(tmp_path / "feats", model, ds, transform, progress=False)


def test_pixels_backbone(image_folder: Path, held_out: Path):
    ds = ImageFolderDataset(image_folder)
    transform = eval_transform_for(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        ex = extract_features(PixelBackbone(16), ds, transform, features=("cls", "avgpool"), progress=False)
        torch.testing.assert_close(ex.features["cls"][0], transform(ds[0][0]).flatten())
        assert ex.features["avgpool"].shape == (12, 3)
        res = evaluate_knn("pixels", ds, ImageFolderDataset(held_out), ks=(3,), device="cpu", progress=False)
    assert res["results"]["3"]["top1"] == 100.0
    assert res["image_size"] == 16 and res["train"]["n_skipped"] == 1


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinokit")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        return args.func(args)


def test_cli_eval_knn_writes_json(image_folder: Path, held_out: Path, tmp_path: Path, capsys):
    out = tmp_path / "res" / "knn.json"
    assert run(["eval", "knn", "pixels", "--train", str(image_folder), "--test", str(held_out),
                "--ks", "1", "3", "50", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "knn" and result["backbone"].startswith("pixels")
    assert result["results"]["3"]["top1"] == 100.0 and result["results"]["50"]["k_used"] == 12
    assert result["train"]["n"] == 12 and result["test"]["skipped"] == result["train"]["skipped"]
    assert "top-1 %" in capsys.readouterr().out
    assert run(["eval", "knn", "pixels", "--train", str(tmp_path / "missing"), "--test", str(image_folder)]) == 2


def test_cli_embed_then_eval_from_feature_folders(image_folder: Path, held_out: Path, tmp_path: Path):
    feats, test_feats = tmp_path / "feats", tmp_path / "test_feats"
    for data, out_dir in ((image_folder, feats), (held_out, test_feats)):
        assert run(["embed", "pixels", "--data", str(data), "--out", str(out_dir), "--features", "cls", "avgpool",
                    "--shard-size", "4", "--device", "cpu", "--no-progress"]) == 0
    assert read_features(feats)["features"]["cls"].dtype == torch.float16
    out = tmp_path / "lin.json"
    # "none" is never resolved: both sets are feature folders.
    assert run(["eval", "linear", "none", "--train", str(feats), "--test", str(test_feats), "--features", "cls",
                "--lrs", "0.1", "--epochs", "20", "--probe-batch-size", "4", "--val-fraction", "0.25",
                "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["results"]["best"]["test_top1"] == 100.0 and result["features"] == ["cls"]


def test_evaluate_linear_with_a_module(image_folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        res = evaluate_linear(tiny_vit(), image_folder, image_folder, lrs=[0.1], epochs=2, probe_batch_size=4,
                              val_fraction=0.25, crop=16, device="cpu", progress=False)
    # Depth 2: the official {last 1, last 4} x {+-avgpool} set with 4 clamped to 2.
    assert res["features"] == ["cls_last1", "cls_last1_avgpool", "cls_last2", "cls_last2_avgpool"]
    assert res["image_size"] == 16 and res["results"]["n_val"] == 3


def test_preprocessed_images_give_the_features_of_the_raw_images(image_folder: Path, held_out: Path):
    """Images preprocessed once (for several backbones) give bit-identical features and the same
    skipped image as the raw dataset; a backbone that needs other preprocessing is refused."""
    train, test = ImageFolderDataset(image_folder), ImageFolderDataset(held_out)
    transform = eval_transform_for(16)
    broken = next(i for i in range(len(train)) if train.path(i).endswith("2_broken.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageDecodeWarning)
        pre_train, pre_test = PreprocessedImages(train, transform), PreprocessedImages(test, transform)
        assert len(pre_train) == len(train) and pre_train[broken] is None and len(pre_train.labels) == len(train) - 1
        for backbone, kinds in ((tiny_vit(), ["cls", "cls_last2_avgpool"]), ("pixels:16", ["cls"])):
            raw = split_features(backbone, train, test, kinds, crop=16, device="cpu", progress=False)
            pre = split_features(backbone, pre_train, pre_test, kinds, crop=16, device="cpu", progress=False)
            for want, got in zip(raw[:2], pre[:2]):
                assert want.features.keys() == got.features.keys() == set(kinds)
                assert all(torch.equal(want.features[k], got.features[k]) for k in want.features)
                assert torch.equal(want.labels, got.labels) and want.skipped == got.skipped == [broken]
            assert pre[2]["transform"] == raw[2]["transform"] == repr(transform)
        with pytest.raises(ValueError, match="preprocessed with"):
            split_features(tiny_vit(), PreprocessedImages(train, eval_transform_for(16, resize=16)), None, ["cls"],
                           crop=16, device="cpu", progress=False)


def test_eval_refuses_features_of_another_backbone_or_preprocessing(image_folder: Path, tmp_path: Path, capsys):
    """A feature folder carries its backbone's identity (weights and preprocessing); evaluating
    it against features made otherwise is an error, while the same backbone passes."""
    feats = tmp_path / "feats"
    assert run(["embed", "pixels:16", "--data", str(image_folder), "--out", str(feats), "--features", "cls",
                "--device", "cpu", "--no-progress"]) == 0
    same = ["eval", "knn", "pixels:16", "--train", str(feats), "--test", str(image_folder), "--ks", "1",
            "--device", "cpu", "--no-progress"]
    assert run(same) == 0
    capsys.readouterr()
    other = ["eval", "knn", "pixels:24", "--train", str(feats), "--test", str(image_folder), "--ks", "1",
             "--device", "cpu", "--no-progress"]
    assert run(other) == 2
    assert "different backbones or preprocessing" in capsys.readouterr().err
    manifest = json.loads((feats / "manifest.json").read_text())
    del manifest["identity"]  # a folder from before identities were recorded
    (feats / "manifest.json").write_text(json.dumps(manifest))
    assert run(same) == 2
    assert "records no backbone identity" in capsys.readouterr().err


def test_feature_identity_follows_weights_and_preprocessing() -> None:
    from dinokit.eval.embed import eval_transform_for, feature_identity

    model = tiny_vit()
    base = feature_identity(model, eval_transform_for(16), 4)
    assert feature_identity(tiny_vit(), eval_transform_for(16), 4) == feature_identity(model, eval_transform_for(16), 4)
    assert feature_identity(model, eval_transform_for(24), 4) != base
    assert feature_identity(model, eval_transform_for(16), 1) != base
    with torch.no_grad():
        model.norm.weight[0] += 1e-3
    assert feature_identity(model, eval_transform_for(16), 4) != base


def test_logreg_reports_early_stop_and_unconverged_fits():
    pytest.importorskip("sklearn")
    from dinokit.eval.logreg import logreg_probe

    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(700, 16, generator=g), torch.randint(0, 4, (700,), generator=g)
    cs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    swept = logreg_probe(x[:500], y[:500], x[500:], y[500:], cs=cs, max_iter=2, patience=None)
    assert swept["skipped_by_patience"] == [] and all(row["val_top1"] is not None for row in swept["grid"])
    assert swept["not_converged"] and all(not row["converged"] for row in swept["grid"] if row["C"] in swept["not_converged"])
    early = logreg_probe(x[:500], y[:500], x[500:], y[500:], cs=cs, patience=1)
    tried = [row["C"] for row in early["grid"] if row["val_top1"] is not None]
    assert early["skipped_by_patience"] == [c for c in cs if c not in tried] and early["skipped_by_patience"]
