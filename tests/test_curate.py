"""`dinokit curate`: embedding shards, dedup, retrieval, clustering, build and report, with ground truth.

Images are generated (random 8x8 colour grids upsampled to 32 px, plus drawn shapes), so the tests
always run; planted near-duplicates are resized, JPEG re-encoded, cropped and mirrored copies.
The embedding is a pixel one: `MirrorPixels` (the image plus its mirror image, centred), invariant
to horizontal flips by construction as a stand-in for a self-supervised ViT trained with flips.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor, nn

from dinokit.cli import main
from dinokit.curate.cluster import (
    balanced_sample,
    default_levels,
    hierarchical_kmeans,
    split_budget,
)
from dinokit.curate.dedup import relative_dedup, run_dedup, self_dedup
from dinokit.curate.embed import embed_pool, write_embeddings
from dinokit.curate.index import (
    ArrayEmbeddings,
    CurateError,
    Embeddings,
    choose_index,
    ivf_self_join,
)
from dinokit.curate.retrieve import retrieve_cluster, retrieve_sample
from dinokit.data.datasets import FileListDataset
from dinokit.eval.embed import read_features


class MirrorPixels(nn.Module):
    """Pixel embedding invariant to horizontal flips: flatten(x + mirror(x)), mean removed."""

    depth = 1

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity()])

    def get_intermediate_layers(self, x: Tensor, n: int = 1, **_: object) -> tuple[tuple[Tensor, Tensor], ...]:
        f = (x + x.flip(-1)).flatten(1)
        f = f - f.mean(1, keepdim=True)
        return tuple((x.flatten(2).transpose(1, 2), f) for _ in range(n))


def generated(i: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(1000 + i)
    im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size - 8, 2))
        w, h = (int(v) for v in rng.integers(6, size // 2, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    return im


def _jpeg(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=50)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


COPIES = {
    "resized": lambda im: im.resize((57, 57), Image.BICUBIC),
    "reencoded": _jpeg,
    "cropped": lambda im: im.crop((2, 1, im.width - 1, im.height - 2)),
    "flipped": ImageOps.mirror,
}


def planted_folder(root: Path, n_orig: int = 120, per_kind: int = 10, offset: int = 0) -> dict[str, str]:
    """`root/orig_XXXX.png` and `root/zcopy_<kind>_XXXX.png` (sorted after their originals);
    returns {copy path: original path}."""
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n_orig):
        generated(offset + i).save(root / f"orig_{i:04d}.png")
    for k, (kind, fn) in enumerate(COPIES.items()):
        for j in range(per_kind):
            src = (k * per_kind + j) % n_orig
            dst = root / f"zcopy_{kind}_{j:04d}.png"
            fn(generated(offset + src)).save(dst)
            truth[str(dst)] = str(root / f"orig_{src:04d}.png")
    return truth


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def synthetic(n: int, dup: int, seed: int = 0, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """n unrelated unit vectors + `dup` noisy copies (cosine ~0.9) appended; (x, (orig, copy) pairs)."""
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((n, dim)))
    orig = rng.choice(n, dup, replace=False)
    copies = unit(base[orig] + 0.5 * rng.standard_normal((dup, dim)) / np.sqrt(dim))
    return np.concatenate([base, copies]), np.stack([orig, np.arange(n, n + dup)], axis=1)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A planted image folder and its embeddings (shards of 37 images, two corrupt files)."""
    root = tmp_path_factory.mktemp("curate")
    truth = planted_folder(root / "images")
    (root / "images" / "broken_a.png").write_bytes(b"not an image")
    (root / "images" / "broken_b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    embed_pool(root / "emb", MirrorPixels(), root / "images", crop=32, shard_size=37, batch_size=64, progress=False)
    return root, root / "emb", truth


# ----------------------------------------------------------------------------- embed


def test_embed_writes_normalised_float16_shards_paths_and_skipped(pool: tuple[Path, Path, dict[str, str]]) -> None:
    _, emb_dir, _ = pool
    manifest = json.loads((emb_dir / "manifest.json").read_text())
    assert manifest["n_dataset"] == 162 and manifest["n_rows"] == 160
    assert len(manifest["shards"]) == 5 and manifest["dtype"] == "float16"
    skipped = (emb_dir / "skipped.txt").read_text().split()
    assert sorted(Path(p).name for p in skipped) == ["broken_a.png", "broken_b.jpg"]
    feats = read_features(emb_dir)  # the layout of `dinokit embed` folders
    x = feats["features"]["cls"]
    assert x.dtype == torch.float16
    assert torch.allclose(x.float().norm(dim=1), torch.ones(160), atol=2e-3)
    emb = Embeddings(emb_dir)
    assert all(Path(p).name not in ("broken_a.png", "broken_b.jpg") for p in emb.paths())
    assert Path(emb.paths([0])[0]).name == "orig_0000.png"  # broken_a.png sorts first but has no row


def test_embed_resumes_only_missing_shards_and_refuses_other_options(pool: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    root, _, _ = pool
    out = tmp_path / "emb"
    embed_pool(out, MirrorPixels(), root / "images", crop=32, shard_size=37, batch_size=64, progress=False)
    before = Embeddings(out).gather(np.arange(160))
    (out / "manifest.json").unlink()  # as if interrupted: shard 2 missing, the others done
    (out / "shard_00002.safetensors").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")}
    embed_pool(out, MirrorPixels(), root / "images", crop=32, shard_size=37, batch_size=64, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors") if p.name in mtimes} == mtimes
    assert (out / "shard_00002.safetensors").is_file()
    np.testing.assert_array_equal(Embeddings(out).gather(np.arange(160)), before)
    with pytest.raises(FileExistsError, match="already holds"):
        embed_pool(out, MirrorPixels(), root / "images", crop=32, shard_size=37, progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(CurateError, match="shard_size was 37, now 50"):
        embed_pool(out, MirrorPixels(), root / "images", crop=32, shard_size=50, progress=False)


def test_embed_sharded_over_ranks_equals_one_process(pool: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    root, emb_dir, _ = pool
    kw = dict(crop=32, shard_size=37, batch_size=64, progress=False, world_size=2)
    assert embed_pool(tmp_path / "emb", MirrorPixels(), root / "images", rank=0, **kw) is None  # rank 1 not done
    assert sorted(p.name for p in (tmp_path / "emb").glob("shard_*")) == [f"shard_{i:05d}.safetensors" for i in (0, 2, 4)]
    manifest = embed_pool(tmp_path / "emb", MirrorPixels(), root / "images", rank=1, **kw)
    assert manifest is not None and manifest["n_rows"] == 160
    np.testing.assert_array_equal(Embeddings(tmp_path / "emb").gather(np.arange(160)), Embeddings(emb_dir).gather(np.arange(160)))
    assert Embeddings(tmp_path / "emb").paths() == Embeddings(emb_dir).paths()


# ----------------------------------------------------------------------------- dedup


def test_self_dedup_finds_planted_copies_of_generated_images(pool: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, emb_dir, truth = pool
    s = run_dedup(emb_dir, tmp_path / "dedup")
    dropped = {line.split("\t")[0]: line.split("\t")[1] for line in (tmp_path / "dedup" / "drop.tsv").read_text().splitlines()}
    found = {c for c, o in truth.items() if dropped.get(c) == o}  # copy dropped, its original kept
    recall = {kind: sum(f"zcopy_{kind}_" in c for c in found) / 10 for kind in COPIES}
    precision = sum(d in truth for d in dropped) / max(len(dropped), 1)
    print(f"recall per kind {recall}, precision {precision:.3f}, {len(dropped)} dropped")
    assert recall == {"resized": 1.0, "reencoded": 1.0, "cropped": 1.0, "flipped": 1.0}
    assert precision == 1.0 and s["n_kept"] == 120 and s["n_groups"] == 40
    # representative rule: the first path of a group (originals sort before their copies)
    groups = [json.loads(line) for line in (tmp_path / "dedup" / "groups.jsonl").read_text().splitlines()]
    assert all(g["keep"] == min(g["members"]) == g["members"][0] for g in groups)
    kept = (tmp_path / "dedup" / "keep.txt").read_text().split()
    assert len(kept) == 120 and all("/orig_" in p for p in kept)


def test_self_dedup_is_independent_of_shard_size_and_ivf_matches_exact(tmp_path: Path) -> None:
    x, pairs = synthetic(3000, 60)
    paths = [f"/img/{i:05d}.png" for i in range(len(x))]
    results = []
    for shard in (7, 1000):
        write_embeddings(tmp_path / f"s{shard}", (x[i:i + 500] for i in range(0, len(x), 500)), paths, "synthetic", shard)
        emb = Embeddings(tmp_path / f"s{shard}")
        np.testing.assert_array_equal(emb.gather(np.arange(len(x))), x)
        results.append(self_dedup(emb, index="ivf_flat"))
    np.testing.assert_array_equal(results[0].keep, results[1].keep)
    np.testing.assert_array_equal(results[0].edges, results[1].edges)
    exact = self_dedup(ArrayEmbeddings(x), index="flat")
    assert results[0].plan.kind == "ivf_join" and exact.plan.kind == "flat"
    np.testing.assert_array_equal(np.sort(exact.drop), np.sort(pairs[:, 1]))  # every copy, nothing else
    np.testing.assert_array_equal(results[0].keep, exact.keep)
    # the join's similarities are the exact ones
    i, j, s = ivf_self_join(ArrayEmbeddings(x), 64, 0.6, nlist=32, nprobe=4)
    np.testing.assert_allclose(s, np.einsum("ij,ij->i", x[i], x[j]), rtol=0, atol=1e-5)


def test_self_dedup_caps_neighbours_at_k_and_rejects_bad_options() -> None:
    x = unit(np.ones((10, 8)) + 1e-3 * np.random.default_rng(0).standard_normal((10, 8)))  # 10 near-identical
    res = self_dedup(ArrayEmbeddings(x), k=3)
    assert len(res.keep) == 1 and res.keep[0] == 0
    assert np.bincount(res.edges[:, 0]).max() == 3  # k-NN graph: at most k edges per image
    with pytest.raises(CurateError, match="threshold"):
        self_dedup(ArrayEmbeddings(x), threshold=1.5)
    with pytest.raises(CurateError, match="index kind"):
        choose_index(10, 8, "hnsw")


def test_choose_index_thresholds() -> None:
    assert choose_index(50_000, 384).kind == "flat"
    ivf = choose_index(1_000_000, 384)
    assert (ivf.kind, ivf.nlist, ivf.nprobe) == ("ivf_flat", 2048, 16)
    pq = choose_index(10_000_000, 384)
    assert pq.kind == "ivf_pq" and 384 % pq.pq_m == 0


def test_relative_dedup_removes_copies_of_an_eval_set(tmp_path: Path) -> None:
    # eval images: 20 generated images; the pool: 60 others + copies of 12 eval images
    ev_root, pool_root = tmp_path / "eval", tmp_path / "pool"
    ev_root.mkdir()
    for i in range(20):
        generated(500 + i).save(ev_root / f"eval_{i:03d}.png")
    pool_root.mkdir()
    for i in range(60):
        generated(i).save(pool_root / f"p_{i:03d}.png")
    for j, (kind, fn) in enumerate(list(COPIES.items())[:3] * 4):
        fn(generated(500 + j)).save(pool_root / f"z_{kind}_{j:03d}.png")
    for src, out in ((ev_root, "ev_emb"), (pool_root, "pool_emb")):
        embed_pool(tmp_path / out, "pixels:32", src, progress=False)
    s = run_dedup(tmp_path / "pool_emb", tmp_path / "rel", against=[str(tmp_path / "ev_emb")])
    drop = [line.split("\t") for line in (tmp_path / "rel" / "drop.tsv").read_text().splitlines()]
    assert s["threshold"] == 0.45 and s["mode"] == "relative"
    assert sorted(Path(d[0]).name for d in drop) == sorted(p.name for p in pool_root.glob("z_*.png"))
    assert all(Path(d[1]).name == f"eval_{int(Path(d[0]).stem.split('_')[-1]):03d}.png" for d in drop)
    embed_pool(tmp_path / "other", MirrorPixels(), ev_root, crop=32, progress=False)
    with pytest.raises(CurateError, match="embedded with"):
        run_dedup(tmp_path / "pool_emb", tmp_path / "rel2", against=[str(tmp_path / "other")])


def test_relative_dedup_in_memory_matches_threshold() -> None:
    x, pairs = synthetic(500, 20, seed=1)
    ev = ArrayEmbeddings(x[pairs[:, 1]])  # the copies are the eval set
    res = relative_dedup(ArrayEmbeddings(x[:500]), [ev])
    np.testing.assert_array_equal(res.drop, np.sort(pairs[:, 0]))
    assert (res.match[:, 2] > 0.45).all()  # type: ignore[index]


# ----------------------------------------------------------------------------- retrieval


def test_sample_retrieval_returns_planted_neighbours_once() -> None:
    rng = np.random.default_rng(2)
    seeds = unit(rng.standard_normal((30, 64)))
    # 4 planted neighbours per seed (cosine ~0.9) among 2000 unrelated pool vectors
    near = unit(np.repeat(seeds, 4, axis=0) + 0.5 * rng.standard_normal((120, 64)) / 8)
    pool_x = np.concatenate([unit(rng.standard_normal((2000, 64))), near])
    res = retrieve_sample(ArrayEmbeddings(pool_x), [ArrayEmbeddings(seeds)], n_per_seed=4)
    np.testing.assert_array_equal(res.positions, np.arange(2000, 2120))
    np.testing.assert_array_equal(res.seed, (res.positions - 2000) // 4)
    # two identical seed sets: the same 120 images, each once
    twice = retrieve_sample(ArrayEmbeddings(pool_x), [ArrayEmbeddings(seeds), ArrayEmbeddings(seeds)], n_per_seed=4)
    assert len(twice.positions) == 120 and twice.info["n_found"] == 240


def test_cluster_retrieval_selects_the_seed_concept_with_caps() -> None:
    rng = np.random.default_rng(3)
    centers = unit(rng.standard_normal((5, 64)))
    concept = np.repeat(np.arange(5), 400)
    pool_x = unit(centers[concept] + 0.6 * rng.standard_normal((2000, 64)) / 8)
    seeds = unit(centers[[2, 2, 2]] + 0.6 * rng.standard_normal((3, 64)) / 8)
    res = retrieve_cluster(ArrayEmbeddings(pool_x), [ArrayEmbeddings(seeds)], n_clusters=5, per_cluster=300)
    assert res.info["n_clusters"] == 5 and res.info["seed_sets"][0]["n_clusters_hit"] == 1
    assert len(res.positions) == 300 and (concept[res.positions] == 2).all()
    capped = retrieve_cluster(ArrayEmbeddings(pool_x), [ArrayEmbeddings(seeds)], n_clusters=5, per_seed_set=50)
    assert len(capped.positions) == 50


# ----------------------------------------------------------------------------- hierarchical k-means


def test_split_budget_water_fills() -> None:
    assert split_budget(10, np.array([1, 8, 8])).tolist() == [1, 5, 4]
    assert split_budget(100, np.array([3, 4])).tolist() == [3, 4]
    out = split_budget(1000, np.array([50, 800, 150, 7]))
    assert out.tolist() == [50, 793, 150, 7]


def test_balanced_sampling_evens_out_imbalanced_concepts() -> None:
    rng = np.random.default_rng(4)
    centers = unit(rng.standard_normal((3, 64)))
    concept = np.repeat(np.arange(3), [1600, 300, 100])
    x = unit(centers[concept] + 0.5 * rng.standard_normal((2000, 64)) / 8)
    h = hierarchical_kmeans(ArrayEmbeddings(x), [30, 3], niter=10)
    assert h.levels == [30, 3]
    sample = balanced_sample(h, 600)
    counts = np.bincount(concept[sample], minlength=3)
    # random sampling would give ~[480, 90, 30]; balanced: ~250 / 250 / 100 (the small concept whole)
    assert len(sample) == 600 and len(np.unique(sample)) == 600
    assert counts[2] == 100 and abs(counts[0] - counts[1]) <= 30, counts
    assert default_levels(1_200_000) == [10000, 500, 50, 10] and default_levels(5000) == [41, 2]
    resampled = hierarchical_kmeans(ArrayEmbeddings(x), [30, 3], niter=10, resample_steps=1)
    counts = np.bincount(concept[balanced_sample(resampled, 600)], minlength=3)
    assert counts[2] == 100 and abs(counts[0] - counts[1]) <= 30, counts
    with pytest.raises(CurateError, match="decreasing"):
        hierarchical_kmeans(ArrayEmbeddings(x), [3, 30])


# ----------------------------------------------------------------------------- command line, end to end


def test_cli_end_to_end_embed_dedup_cluster_build_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = planted_folder(tmp_path / "images", n_orig=60, per_kind=5)
    ev = tmp_path / "eval"
    ev.mkdir()
    for i in range(5):  # the eval set: 5 pool originals (as if the pool had leaked test images)
        generated(i).resize((40, 40), Image.BICUBIC).save(ev / f"e{i}.png")
    assert main(["curate", "embed", "pixels:32", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "emb"),
                 "--no-progress", "--shard-size", "30"]) == 0
    assert main(["curate", "embed", "pixels:32", "--data", str(ev), "--out", str(tmp_path / "ev_emb"), "--no-progress"]) == 0
    assert main(["curate", "dedup", str(tmp_path / "emb"), "--out", str(tmp_path / "d1")]) == 0
    assert main(["curate", "dedup", str(tmp_path / "emb"), "--after", str(tmp_path / "d1"), "--against",
                 str(tmp_path / "ev_emb"), "--out", str(tmp_path / "d2")]) == 0
    assert main(["curate", "cluster", str(tmp_path / "emb"), "--after", str(tmp_path / "d1"), str(tmp_path / "d2"),
                 "--levels", "6", "2", "--target", "20", "--out", str(tmp_path / "cl")]) == 0
    assert main(["curate", "retrieve", str(tmp_path / "emb"), "--seeds", str(tmp_path / "ev_emb"), "--out",
                 str(tmp_path / "rt")]) == 0
    assert main(["curate", "build", str(tmp_path / "emb"), str(tmp_path / "d1"), str(tmp_path / "d2"), str(tmp_path / "cl"),
                 "--out", str(tmp_path / "curated.txt")]) == 0
    assert main(["curate", "report", str(tmp_path / "d1"), str(tmp_path / "d2"), str(tmp_path / "cl"), "--out",
                 str(tmp_path / "report")]) == 0
    d1 = json.loads((tmp_path / "d1" / "summary.json").read_text())
    d2 = json.loads((tmp_path / "d2" / "summary.json").read_text())
    # pixel embedding (not mirror-invariant): the 15 resized / re-encoded / cropped copies are found
    dropped = {line.split("\t")[0] for line in (tmp_path / "d1" / "drop.tsv").read_text().splitlines()}
    assert {c for c in truth if "flipped" not in c} <= dropped <= set(truth)
    assert d2["n_in"] == d1["n_kept"] and d2["n_dropped"] == 5
    listed = (tmp_path / "curated.txt").read_text().split()
    assert len(listed) == 20 and set(listed) <= set((tmp_path / "d2" / "keep.txt").read_text().split())
    assert len(FileListDataset(tmp_path / "curated.txt")) == 20  # what `dinokit train ... data.dataset=filelist` reads
    assert (tmp_path / "report" / "duplicate_groups.png").is_file() and (tmp_path / "report" / "clusters.png").is_file()
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"| dedup | self | 80 | {d1['n_kept']} |" in report
    rt = json.loads((tmp_path / "rt" / "summary.json").read_text())
    assert rt["n_unique"] == rt["n_kept"] >= 5  # the 5 leaked originals at least


def test_cli_errors_name_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["curate", "dedup", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope holds no manifest.json" in capsys.readouterr().err
    assert main(["curate", "build", str(tmp_path / "nope"), str(tmp_path / "x"), "--out", str(tmp_path / "l.txt")]) == 2


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST IDX files absent (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_planted_copies_are_found(tmp_path: Path) -> None:
    from dinokit.data.datasets import FashionMNIST

    ds = FashionMNIST(FMNIST, "test")
    root = tmp_path / "fm"
    root.mkdir()
    for i in range(200):
        ds[i][0].save(root / f"a_{i:04d}.png")
    truth = {}
    for j, kind in enumerate(["resized", "reencoded"] * 10):
        COPIES[kind](ds[j][0]).save(root / f"z_{kind}_{j:04d}.png")
        truth[str(root / f"z_{kind}_{j:04d}.png")] = j
    embed_pool(tmp_path / "emb", "pixels:28", root, progress=False)
    emb = Embeddings(tmp_path / "emb")
    # A threshold calibrated for raw pixels (cosine 0.98): at the default (0.6, made for learned
    # embeddings) the 200 distinct garments fall into a handful of components, which would make
    # any recall meaningless.
    res = self_dedup(emb, threshold=0.98)
    paths = emb.paths()
    comp = res.component
    pos = {p: i for i, p in enumerate(paths)}
    assert comp is not None
    linked = [comp[pos[c]] == comp[o] for c, o in truth.items()]
    assert all(linked)  # recall: every planted copy is in its original's component
    originals = [comp[pos[str(root / f"a_{i:04d}.png")]] for i in range(200)]
    # precision: distinct images stay apart (one near-identical pair of garments in the first 200)
    assert len(set(originals)) >= 199


def test_curate_demo_refuses_a_folder_that_holds_files(tmp_path: Path) -> None:
    """The demo script never deletes the folder it is given (it once ran `rm -rf "$OUT"`)."""
    import subprocess

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    script = Path(__file__).resolve().parents[1] / "scripts" / "curate_demo.sh"
    proc = subprocess.run(["bash", str(script), str(out), "pixels:28"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "not an empty folder" in proc.stderr
    assert (out / "notes.txt").read_text() == "keep"


def test_faiss_gpu_is_explicit_and_ivf_pq_sizes_are_checked_for_it() -> None:
    import faiss

    from dinokit.curate.index import CurateError, choose_index, gpu_supports_pq, use_gpu

    assert use_gpu(None) is False and use_gpu(False) is False  # never automatic
    if faiss.get_num_gpus() == 0:
        with pytest.raises(CurateError, match="--gpu: this Faiss build sees no GPU"):
            use_gpu(True)
    assert gpu_supports_pq(384, 96) and gpu_supports_pq(768, 48) and gpu_supports_pq(128, 32)
    assert not gpu_supports_pq(1536, 384)  # ViT-g at D / 4 bytes: over faiss-gpu's 96
    assert not gpu_supports_pq(384, 6)  # 64 dimensions per sub-quantizer: over 32
    assert not gpu_supports_pq(100, 20)  # 20 bytes, but 5 dimensions each
    assert choose_index(10_000_000, 1536).pq_m == 384  # the CPU plan is unchanged: kept on the CPU
