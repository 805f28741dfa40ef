"""Logistic-regression probe: the cheaper alternative to the SGD linear probe (DINOv2 `log_regression`).

scikit-learn `LogisticRegression` (L2 penalty, lbfgs, multinomial) on standardised features
(mean / std of the train split), with the inverse regularisation strength C chosen on a
validation split carved from train (seeded, shared with `linear_probe`'s `split_train_val`); the
chosen model's test accuracy is reported (no refit on train + validation, as in `linear_probe`).

Needs scikit-learn (`pip install scikit-learn`); imported only when called.

Example:
    >>> res = logreg_probe(train_x, train_y, test_x, test_y, cs=(0.01, 0.1, 1.0))
    >>> res["best"]
    {'C': 0.1, 'val_top1': 84.0, 'test_top1': 83.2, 'test_top5': 99.6}
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Sequence

import numpy as np
from torch import Tensor

from dinokit.eval.linear import split_train_val

__all__ = ["DEFAULT_CS", "logreg_probe"]

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.arange(-4, 3))  # 1e-4 ... 100


def _topk_acc(proba: np.ndarray, classes: np.ndarray, y: np.ndarray, k: int) -> float:
    top = classes[np.argsort(-proba, axis=1, kind="stable")[:, :k]]
    return float(100.0 * (top == y[:, None]).any(axis=1).mean())


def logreg_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
    threads: int | None = 1,
    patience: int | None = 2,
) -> dict[str, Any]:
    """Fit one L2 logistic regression per C, pick C on validation, report test top-1 / top-5.

    Args:
        train_feats: (N, D); train_labels: (N,) int >= 0.
        test_feats: (M, D); test_labels: (M,).
        cs: inverse regularisation strengths to try.
        threads: BLAS / OpenMP threads for the fits (None: the libraries' default, all cores).
            One by default: sklearn's loss (OpenMP) and BLAS each start a pool per core, and on a
            busy machine the pools' spin-waiting made fits 30x slower (33 s vs 1.1 s measured on 2
            loaded cores); the problem is small enough per iteration that one thread is fast.
        patience: stop the (ascending) C sweep after this many Cs in a row without a better
            validation accuracy (None: try all). Accuracy against C is usually single-peaked, and
            the large Cs are the slow fits (they run to max_iter), so this saves most of the time.

    Returns:
        {"best": {C, val_top1, test_top1[, test_top5]},
         "grid": [{C, val_top1 (None: skipped by patience), n_iter, converged, seconds}, ...],
         "n_train", "n_val", "n_test", "num_classes",
         "not_converged": [C that stopped at max_iter], "skipped_by_patience": [C not tried]}.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    if not len(cs):
        raise ValueError("no C given")
    x = train_feats.float().cpu().numpy().astype(np.float64)
    y = train_labels.cpu().numpy()
    xt = test_feats.float().cpu().numpy().astype(np.float64)
    yt = test_labels.cpu().numpy()
    if (y < 0).any() or (yt < 0).any():
        raise ValueError("labels must be >= 0 (an unlabelled dataset gives -1)")
    tr, val = (i.numpy() for i in split_train_val(len(y), val_fraction, seed))
    mean = x[tr].mean(axis=0)
    std = x[tr].std(axis=0)
    std[std < 1e-8] = 1.0  # constant features (e.g. a border pixel of the raw-pixel baseline)
    x = (x - mean) / std
    xt = (xt - mean) / std

    # Ascending C with warm start: each fit starts from the previous (more regularised) solution,
    # which cuts lbfgs iterations several-fold on a grid; results are still each C's optimum.
    order = sorted(range(len(cs)), key=lambda i: float(cs[i]))
    clf = LogisticRegression(C=1.0, max_iter=max_iter, warm_start=True, random_state=seed)
    grid: list[dict[str, Any]] = [{"C": float(c), "val_top1": None} for c in cs]  # None: not tried
    best_j, best_params, since_best = -1, None, 0
    x_tr, y_tr, x_val, y_val = x[tr], y[tr], x[val], y[val]
    for j in order:
        if patience is not None and since_best >= patience:
            break
        t0 = time.time()
        clf.set_params(C=float(cs[j]))
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=threads):
            # Large C may hit max_iter, which still gives a usable model: the warning is not
            # printed per fit but counted, and each C says whether it converged.
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x_tr, y_tr)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        acc = float(100.0 * (clf.predict(x_val) == y_val).mean())
        grid[j] = {"C": float(cs[j]), "val_top1": acc, "n_iter": int(np.max(clf.n_iter_)), "converged": converged,
                   "seconds": round(time.time() - t0, 2)}
        # Strictly better only: on ties the smaller C (visited first) is kept.
        if best_params is None or acc > grid[best_j]["val_top1"]:
            best_j, best_params, since_best = j, (clf.coef_.copy(), clf.intercept_.copy()), 0
        else:
            since_best += 1
    j = best_j
    clf.coef_, clf.intercept_ = best_params
    num_classes = int(max(y.max(), yt.max() if len(yt) else 0)) + 1
    best: dict[str, Any] = {"C": grid[j]["C"], "val_top1": grid[j]["val_top1"],
                            "test_top1": float(100.0 * (clf.predict(xt) == yt).mean())}
    if num_classes >= 5 and len(clf.classes_) >= 5:
        best["test_top5"] = _topk_acc(clf.predict_proba(xt), clf.classes_, yt, 5)
    return {"best": best, "grid": grid, "n_train": len(tr), "n_val": len(val), "n_test": len(yt),
            "num_classes": num_classes,
            "not_converged": [g["C"] for g in grid if g["val_top1"] is not None and not g["converged"]],
            "skipped_by_patience": [g["C"] for g in grid if g["val_top1"] is None]}
