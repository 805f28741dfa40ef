"""Pictures of what a backbone learned and of how its training went (DINO's attention maps, DINOv2's PCA pictures).

- `attention`: last-block [CLS] attention maps per head, DINO's emergent object masks.
- `pca`: PCA of patch features as colours, background removed (DINOv2 style).
- `curves`: losses, schedules, health signals and online k-NN accuracy of a run (needs matplotlib).
- `commands`: the `dinokit viz attention|pca|curves` command line.

Example:
    >>> from dinokit.viz import attention_maps, attention_picture, prepare_image
    >>> shown, x = prepare_image(image, model.patch_size, 224)
    >>> attention_picture(shown, attention_maps(model, x), "attention.png", threshold=0.6)
"""

from dinokit.viz.attention import attention_maps, attention_picture, prepare_image, threshold_masks
from dinokit.viz.curves import load_records, plot_curves
from dinokit.viz.pca import PcaPicture, foreground_mask, pca_features, pca_image, pca_picture, pca_rgb

__all__ = [
    "PcaPicture",
    "attention_maps",
    "attention_picture",
    "foreground_mask",
    "load_records",
    "pca_features",
    "pca_image",
    "pca_picture",
    "pca_rgb",
    "plot_curves",
    "prepare_image",
    "threshold_masks",
]
