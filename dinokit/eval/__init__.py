"""Evaluation of frozen backbones: features (`embed`), k-NN, linear probe, logistic regression.

Data flows one way: images -> `embed` (features, optionally streamed to safetensors shards) ->
`knn` / `linear` / `logreg` (plain tensor algorithms, no backbone) -> results. `commands` joins
them for the command line (`dinokit embed`, `dinokit eval ...`) and for Python callers.
"""

from dinokit.eval.commands import add_commands, evaluate_knn, evaluate_linear, evaluate_logreg, split_features
from dinokit.eval.embed import (
    OFFICIAL_LINEAR_FEATURES,
    Extracted,
    PixelBackbone,
    PreprocessedImages,
    eval_transform_for,
    extract_features,
    iter_feature_shards,
    open_dataset,
    read_features,
    resolve_feature_model,
    write_feature_shards,
)
from dinokit.eval.knn import few_shot_indices, knn_classify
from dinokit.eval.linear import linear_probe
from dinokit.eval.logreg import logreg_probe  # imports scikit-learn only when called

__all__ = [
    "OFFICIAL_LINEAR_FEATURES",
    "Extracted",
    "PixelBackbone",
    "PreprocessedImages",
    "add_commands",
    "eval_transform_for",
    "evaluate_knn",
    "evaluate_linear",
    "evaluate_logreg",
    "extract_features",
    "few_shot_indices",
    "iter_feature_shards",
    "knn_classify",
    "linear_probe",
    "logreg_probe",
    "open_dataset",
    "read_features",
    "resolve_feature_model",
    "split_features",
    "write_feature_shards",
]
