"""FID / IS / precision-recall against closed forms and brute force; sqrtm robustness."""
import numpy as np
import pytest

from repa.sampler.metrics import (feature_statistics, frechet_distance, inception_score, manifold_radii,
                             precision_recall)


def closed_form_fd(m1, s1, m2, s2):
    """Frechet distance for commuting (diagonal) covariances: |m1-m2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    return float(((m1 - m2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())


def test_fid_of_gaussian_samples_vs_closed_form():
    rng = np.random.default_rng(0)
    d, n = 16, 40000
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    # a common random rotation keeps the covariances commuting but not diagonal
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x1 = (rng.normal(size=(n, d)) * np.sqrt(v1)) @ q.T + m1 @ q.T
    x2 = (rng.normal(size=(n, d)) * np.sqrt(v2)) @ q.T + m2 @ q.T
    fid, info = frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    exact = closed_form_fd(m1, v1, m2, v2)
    assert info["method"] == "scipy.linalg.sqrtm" and not info["notes"]
    assert abs(fid - exact) < 0.02 * exact + 0.05
    # exact statistics give the closed form to machine precision
    s1, s2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    assert frechet_distance(m1 @ q.T, s1, m2 @ q.T, s2)[0] == pytest.approx(exact, rel=1e-9)
    assert frechet_distance(m1, s1, m1, s1)[0] == pytest.approx(0.0, abs=1e-9)


def test_sqrtm_robust_on_near_singular_covariances():
    rng = np.random.default_rng(1)
    d = 48
    a, b = rng.normal(size=(d, 5)), rng.normal(size=(d, 6))
    s1, s2 = a @ a.T, b @ b.T  # rank 5 and 6 in 48 dims
    s1[0, 0] += 1e-14
    m = np.zeros(d)
    fid, info = frechet_distance(m, s1, m, s2)
    assert np.isfinite(fid)
    # the exact value, through the symmetric PSD form tr sqrt(S1^1/2 S2 S1^1/2)
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    assert fid == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-4)
    assert "sqrtm_check" in info and "trace_sqrtm_eig" in info
    # the low-rank sample path agrees
    x = rng.normal(size=(10, d)) * 2
    mu2, sig2 = feature_statistics(x)
    f_full, _ = frechet_distance(m, s1 + np.eye(d), mu2, sig2)
    f_low, info_low = frechet_distance(m, s1 + np.eye(d), mu2, sig2, features2=x)
    assert f_low == pytest.approx(f_full, rel=1e-6) and "low-rank" in info_low["method"]


def test_fd_rejects_bad_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_inception_score_definition():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(30, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p.mean(0)
    expected = np.exp(np.mean((p * (np.log(p) - np.log(py))).sum(1)))
    assert inception_score(logits) == pytest.approx(expected, rel=1e-10)
    # one-hot confident and uniform over K classes -> IS = K
    assert inception_score(np.eye(5) * 200) == pytest.approx(5.0, rel=1e-6)
    # splits: mean of per-split scores
    assert inception_score(logits, split_size=10) == pytest.approx(
        np.mean([inception_score(logits[i:i + 10]) for i in (0, 10, 20)]), rel=1e-12)


def test_precision_recall_vs_brute_force():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(60, 5))
    smp = rng.normal(size=(50, 5)) * 1.5 + 0.5
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((smp[:, None] - smp[None]) ** 2).sum(-1)
    d_sr = ((smp[:, None] - ref[None]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(d_rr, 1)[:, 3], np.sort(d_ss, 1)[:, 3]
    np.testing.assert_allclose(manifold_radii(ref, 3), r_ref, rtol=1e-9, atol=1e-9)
    precision = np.mean((d_sr <= r_ref[None]).any(1))
    recall = np.mean((d_sr.T <= r_smp[None]).any(1))
    p, r = precision_recall(ref, smp, k=3, batch=16)  # small batch exercises the tiling
    assert (p, r) == (pytest.approx(precision), pytest.approx(recall))
    assert 0 < p < 1 and 0 < r < 1


def test_sqrtm_fallbacks_are_taken_and_reported(monkeypatch):
    """Non-finite / complex sqrtm results trigger the eps*I retry, then the exact eigenvalue form."""
    import scipy.linalg

    from repa.sampler import metrics
    rng = np.random.default_rng(4)
    d = 6
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2, m = a @ a.T, b @ b.T, np.zeros(d)
    exact, _ = frechet_distance(m, s1, m, s2)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky(x):  # first call: NaNs; later calls: fine
        calls.append(1)
        return np.full_like(x, np.nan) if len(calls) == 1 else real_sqrtm(x)
    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", flaky)
    value, info = frechet_distance(m, s1, m, s2, eps=1e-9)
    assert info["offset_eps"] == 1e-9 and "non-finite" in info["notes"][0]
    assert value == pytest.approx(exact, rel=1e-6)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", lambda x: real_sqrtm(x) + 0.5j)  # large imaginary part
    value, info = frechet_distance(m, s1, m, s2)
    assert info["method"].startswith("eigh") and len(info["notes"]) == 2
    assert value == pytest.approx(exact, rel=1e-8)
