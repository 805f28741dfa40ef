"""Online k-NN during training: how well the teacher's [CLS] features separate labeled classes.

The two datasets are opened (and subsampled with a fixed seed) once, when training starts, so a
bad path fails before any work. The evaluation runs on the teacher backbone in eval mode, under
`torch.no_grad`, inside `torch.random.fork_rng`: it draws nothing from the training process's
random streams, so enabling it never changes the training itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dinokit.config import Config
from dinokit.data.datasets import DatasetError
from dinokit.eval.embed import eval_transform_for, extract_features, open_dataset, subset
from dinokit.eval.knn import knn_classify


class OnlineKNN:
    """Weighted k-NN top-1 / top-5 of the teacher's features, every `eval.knn_every` steps."""

    def __init__(self, cfg: Config, train_dataset: Any) -> None:
        ev = cfg.eval
        bank = open_dataset(ev.knn_train, "train") if ev.knn_train else train_dataset
        if not ev.knn_train and not _has_labels(bank):
            raise DatasetError("online k-NN needs labels: the training data has none; set eval.knn_train")
        self.bank = subset(bank, ev.knn_train_size, seed=0)
        self.val = subset(open_dataset(ev.knn_val, "test"), ev.knn_val_size, seed=1)
        self.transform = eval_transform_for(cfg.crops.global_size)
        self.k = ev.knn_k
        self.every = ev.knn_every

    def set_image_size(self, size: int) -> None:
        """Evaluate at another crop size from now on (after a resolution switch)."""
        self.transform = eval_transform_for(size)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                bank = extract_features(backbone, self.bank, self.transform, progress=False)
                val = extract_features(backbone, self.val, self.transform, progress=False)
        finally:
            backbone.train(was_training)
        res = knn_classify(bank.features["cls"], bank.labels, val.features["cls"], val.labels, ks=(self.k,))
        out = {"knn_top1": res[self.k]["top1"]}
        if "top5" in res[self.k]:
            out["knn_top5"] = res[self.k]["top5"]
        return out


def _has_labels(dataset: Any) -> bool:
    if hasattr(dataset, "classes"):
        return bool(getattr(dataset, "classes"))
    return hasattr(dataset, "targets")
