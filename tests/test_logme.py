"""LogME against a brute-force evidence, its fixed point, and what it ranks."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.logme import class_evidence, log_evidence, logme


def brute_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, F F^T / alpha + I / beta): the marginal likelihood with the full n x n covariance."""
    n = len(y)
    cov = f @ f.T / alpha + np.eye(n) / beta
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(cov, y)))


def maximized(f: np.ndarray, y: np.ndarray):
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    keep = s > 1e-10 * s.max()
    z = u[:, keep].T @ y
    return class_evidence(s[keep], z, float(y @ y), *f.shape), (s[keep], z)


# A small worked example: 6 samples, 2 features, the target mostly the first feature.
F_SMALL = np.array([[1.0, 0.2], [0.9, -0.1], [0.1, 1.0], [-0.2, 0.8], [1.1, 0.3], [0.0, -0.9]])
Y_SMALL = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])


def example(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The worked example at (6, 2); else seeded features with a noisy one-feature target."""
    if shape == (6, 2):
        return F_SMALL, Y_SMALL
    rng = np.random.default_rng(0)
    f = rng.normal(size=shape)
    return f, (f[:, 0] + 0.3 * rng.normal(size=shape[0]) > 0).astype(float)


@pytest.mark.parametrize("shape", [(6, 2), (40, 5), (12, 30)], ids=["worked", "n>D", "n<D"])
def test_evidence_equals_the_full_covariance_marginal_at_the_fixed_point(shape: tuple[int, int]) -> None:
    f, y = example(shape)
    ev, (s, z) = maximized(f, y)
    assert ev.iterations < 1000 and ev.alpha > 0 and ev.beta > 0
    assert ev.evidence == pytest.approx(brute_evidence(f, y, ev.alpha, ev.beta), rel=1e-9, abs=1e-9)
    # Also away from the fixed point: the SVD formula is the evidence for any alpha, beta.
    assert log_evidence(s, z, float(y @ y), *f.shape, 0.3, 7.0) == pytest.approx(brute_evidence(f, y, 0.3, 7.0))


def test_fixed_point_satisfies_the_stationarity_conditions_in_weight_space() -> None:
    """MacKay's conditions from the D x D posterior: alpha |m|^2 = gamma and beta |Fm - y|^2 = n - gamma."""
    f, y = F_SMALL, Y_SMALL
    ev, _ = maximized(f, y)
    n, d = f.shape
    a_mat = ev.alpha * np.eye(d) + ev.beta * f.T @ f
    m = ev.beta * np.linalg.solve(a_mat, f.T @ y)
    gamma = d - ev.alpha * np.trace(np.linalg.inv(a_mat))
    assert ev.alpha * m @ m == pytest.approx(gamma, rel=1e-6)
    assert ev.beta * np.sum((f @ m - y) ** 2) == pytest.approx(n - gamma, rel=1e-6)


@pytest.mark.parametrize("shape", [(6, 2), (12, 30)], ids=["worked", "n<D"])
def test_the_fixed_point_is_a_maximum(shape: tuple[int, int]) -> None:
    f, y = example(shape)
    ev, _ = maximized(f, y)
    best = brute_evidence(f, y, ev.alpha, ev.beta)
    for da, db in [(1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95), (1.05, 1.05), (0.95, 0.95), (1.05, 0.95), (2, 0.5)]:
        assert brute_evidence(f, y, ev.alpha * da, ev.beta * db) < best, (da, db)


def test_logme_is_the_mean_over_classes_of_evidence_per_sample() -> None:
    rng = np.random.default_rng(2)
    f = rng.normal(size=(30, 4))
    labels = rng.integers(0, 3, size=30)
    expected = np.mean([maximized(f, (labels == k).astype(float))[0].evidence / 30 for k in range(3)])
    assert logme(f, labels) == pytest.approx(expected, rel=1e-9)


def test_separable_features_score_above_the_same_features_with_shuffled_labels() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 25)
    centers = rng.normal(scale=3.0, size=(4, 16))
    f = centers[labels] + rng.normal(size=(100, 16))
    shuffled = rng.permutation(labels)
    assert logme(f, labels) > logme(f, shuffled) + 0.1
    # Scale-free: features scaled by any factor keep their score (alpha absorbs the scale).
    assert logme(100 * f, labels) == pytest.approx(logme(f, labels), rel=1e-6)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        logme(np.zeros((5, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="two classes"):
        logme(np.ones((5, 3)), np.zeros(5))
