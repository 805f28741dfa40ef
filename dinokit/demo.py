"""Feature-extraction demo: a photo through a DINO / DINOv2 backbone, features and a PCA picture.

Until training lands this is the main job of the quick start. Without `--weights` the backbone is
randomly initialised (no weights are downloaded, ever), so the PCA picture then shows positional
structure rather than objects; with an official checkpoint file it shows the familiar parts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from dinokit.checkpoint import load_backbone
from dinokit.models import build_official
from dinokit.viz.pca import pca_image as pca_picture  # plain 3-component PCA of all patches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def demo_image() -> tuple[Image.Image, str]:
    """The astronaut photo shipped in the scikit-image wheel, or a drawn scene without it."""
    try:
        from skimage import data

        return Image.fromarray(data.astronaut()), "skimage.data.astronaut"
    except ImportError:
        yy, xx = np.mgrid[0:256, 0:256]
        img = np.zeros((256, 256, 3), np.uint8)
        img[..., 2] = 60 + yy // 2  # sky-like gradient
        disc = (yy - 140) ** 2 + (xx - 110) ** 2 < 60**2
        img[disc] = (220, 120, 40)
        img[(yy > 200)] = (40, 140, 60)
        return Image.fromarray(img), "drawn scene (install scikit-image for a real photo)"


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (1, 3, size, size), bicubic resize and ImageNet normalisation."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def run_demo(out_dir: Path, arch: str, weights: Path | None, image_path: Path | None, size: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if image_path is not None:
        image, source = Image.open(image_path), str(image_path)
    else:
        image, source = demo_image()
    model = build_official(arch).eval()
    if weights is not None:
        load_backbone(model, weights)
    p = model.patch_size
    size = max(p, size // p * p)
    x = to_tensor(image, size)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.forward_features(x)
        last4 = model.get_intermediate_layers(x, n=4, return_class_token=True)
    seconds = time.perf_counter() - start
    cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
    assert cls is not None and patches is not None
    grid = (size // p, size // p)
    save_file(
        {"cls": cls.contiguous(), "patch_tokens": patches.contiguous(), "last4_cls": torch.cat([c for _, c in last4], -1)},
        str(out_dir / "features.safetensors"),
    )
    pca_picture(patches[0], grid).save(out_dir / "pca.png")
    image.convert("RGB").resize((size, size)).save(out_dir / "input.png")
    summary = {
        "image": source,
        "architecture": arch,
        "weights": str(weights) if weights else "random initialisation (no weights given)",
        "input_size": size,
        "cls_shape": list(cls.shape),
        "patch_tokens_shape": list(patches.shape),
        "forward_seconds": round(seconds, 3),
        "outputs": ["features.safetensors", "pca.png", "input.png"],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
