"""Logistic-regression probes of frozen features (scikit-learn), on all or a few labels per class."""
import logging
import warnings

import numpy as np

_log = logging.getLogger(__name__)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> float:
    """Top-1 (%) on val of a logistic regression fitted on standardized train features [N, D]."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # a probe that stops at max_iter is still a valid (slightly under-fitted) probe; it is logged
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x), train_y)
    if int(np.max(clf.n_iter_)) >= max_iter:
        _log.info("logistic regression stopped at --max_iter %d before converging", max_iter)
    return float(100.0 * (clf.predict(scaler.transform(val_x)) == val_y).mean())


def few_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` random samples of every class (all of a class that has fewer), sorted."""
    rng = np.random.RandomState(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))
