"""LogME: how well a frozen backbone's features suit a labelled dataset, without training.

You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning".
Each class ``k`` is a regression target ``y_k`` (its one-hot column) on the features ``F``
(``n x D``): ``y_k = F w + e`` with prior ``w ~ N(0, I / alpha)`` and noise ``e ~ N(0, I / beta)``.
The evidence ``p(y_k | F, alpha, beta)`` is maximized over ``alpha, beta`` by MacKay's fixed
point (the paper's Algorithm 1), all classes sharing one SVD of ``F``:

    gamma = sum_i beta s_i^2 / (alpha + beta s_i^2)
    alpha = gamma / |m|^2,    beta = (n - gamma) / |F m - y|^2,

where ``m`` is the posterior mean. LogME is the maximized log evidence divided by ``n``,
averaged over classes: higher means a linear model on these features explains the labels
better. At the fixed point both derivatives of the evidence are zero (the update equations are
those conditions rearranged), so what it returns is a stationary point of the evidence, which
``tests/test_logme.py`` checks against a brute-force evidence with the ``n x n`` covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClassEvidence", "class_evidence", "log_evidence", "logme"]

_LOG_2PI = float(np.log(2 * np.pi))


@dataclass(frozen=True)
class ClassEvidence:
    """The maximized evidence of one target: ``evidence`` is the log evidence over ``n`` samples."""

    evidence: float
    alpha: float
    beta: float
    iterations: int


def log_evidence(s: np.ndarray, z: np.ndarray, y_sq: float, n: int, d: int, alpha: float, beta: float) -> float:
    """Log evidence of Bayesian linear regression from the SVD ``F = U diag(s) V^T`` (PRML eq. 3.86).

    Args:
        s: the nonzero singular values of ``F`` (``r`` of them).
        z: ``U^T y`` (``r`` values); ``y_sq``: ``|y|^2``.
        n, d: samples and feature dimensions; ``d - r`` eigenvalues of ``F^T F`` are zero.
        alpha, beta: prior and noise precision.
    """
    sigma = s * s
    denom = alpha + beta * sigma
    m_coef = beta * s * z / denom  # the posterior mean in the V basis
    residual = float(np.sum((s * m_coef - z) ** 2) + max(y_sq - float(z @ z), 0.0))
    log_det_a = float(np.sum(np.log(denom)) + (d - len(s)) * np.log(alpha))
    return 0.5 * (
        n * np.log(beta) + d * np.log(alpha) - n * _LOG_2PI - beta * residual - alpha * float(m_coef @ m_coef) - log_det_a
    )


def class_evidence(
    s: np.ndarray, z: np.ndarray, y_sq: float, n: int, d: int, max_iter: int = 1000, tol: float = 1e-7
) -> ClassEvidence:
    """Maximize :func:`log_evidence` over ``alpha, beta`` by the fixed point, from ``alpha = beta = 1``.

    Usually a few iterations; where the labels say little about the features (noise, ``n < D``)
    the evidence is flat along a ridge of ``alpha, beta`` and the fixed point crawls along it for
    hundreds of steps. Each step costs ``O(r)``, so it runs to ``tol`` rather than the paper's 11 steps.
    """
    sigma = s * s
    alpha, beta = 1.0, 1.0
    for it in range(1, max_iter + 1):
        denom = alpha + beta * sigma
        m_coef = beta * s * z / denom
        gamma = float(np.sum(beta * sigma / denom))
        m_sq = float(m_coef @ m_coef)
        residual = float(np.sum((s * m_coef - z) ** 2) + max(y_sq - float(z @ z), 0.0))
        # Guards for degenerate targets (a class absent from the sample, or fitted exactly).
        new_alpha = gamma / max(m_sq, 1e-300)
        new_beta = max(n - gamma, 1e-12) / max(residual, 1e-300)
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return ClassEvidence(log_evidence(s, z, y_sq, n, d, alpha, beta), alpha, beta, it)


def logme(features: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """LogME of ``features`` (``n x D``) for integer ``labels``: mean over classes of evidence / n.

    Computed in float64 (the evidence sums ``n`` log terms). Classes absent from ``labels``
    are not scored: their all-zero target says nothing about the features.

    Raises:
        ValueError: shapes that do not match, or fewer than two classes present.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if f.ndim != 2 or len(f) != len(y):
        raise ValueError(f"features {f.shape} and labels {y.shape} do not match")
    present = np.unique(y)
    if num_classes is not None:
        present = present[present < num_classes]
    if len(present) < 2:
        raise ValueError(f"LogME needs at least two classes, got {len(present)}")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > s.max() * max(n, d) * np.finfo(np.float64).eps  # the numerical rank
    u, s = u[:, keep], s[keep]
    scores = []
    for k in present:
        target = (y == k).astype(np.float64)
        z = u.T @ target
        scores.append(class_evidence(s, z, float(target @ target), n, d).evidence / n)
    return float(np.mean(scores))
