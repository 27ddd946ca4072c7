"""FID, sFID, Inception Score and precision/recall following the ADM evaluator (guided-diffusion).

* statistics: mean and ``np.cov(rowvar=False)`` (unbiased) of float64 features;
* FID / sFID: Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` on pool3 / spatial features;
* IS: ``exp(E_x KL(p(y|x) || p(y)))`` on softmax(logits) over splits of 5000 samples, mean over splits;
* precision / recall: k-NN manifolds (k = 3, squared Euclidean distances, radius = distance to the k-th nearest
  neighbour excluding the point itself); precision = share of samples inside the reference manifold, recall = share
  of references inside the sample manifold (Kynkaanniemi et al. 2019, as ADM's ``ManifoldEstimator``).

The matrix square root is the classic trap: ``scipy.linalg.sqrtm`` of the (non-symmetric) product S1 S2 can return
non-finite values or large imaginary parts for near-singular covariances (few samples, dead features), and
silently taking ``.real`` then gives a wrong FID. ``frechet_distance`` checks finiteness, the residual
``|sqrtm(A)^2 - A| / |A|`` and the imaginary part; if anything is off it retries with ``eps * I`` added to both
covariances (as ADM does), and cross-checks the trace against the symmetric eigenvalue form
``tr sqrt(S1^1/2 S2 S1^1/2)`` (exact for PSD matrices). Everything it did is reported in the returned info.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "manifold_radii", "precision_recall"]

IMAG_TOL = 1e-3       # max |imag| of sqrtm relative to max |real| before we refuse the result
RESIDUAL_TOL = 1e-3   # relative Frobenius residual of sqrtm(A)^2 vs A


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64: mean and unbiased covariance of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt_product_eig(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrtm(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) for symmetric PSD S1, S2 (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _sqrtm_checked(a: np.ndarray) -> tuple[np.ndarray | None, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(a)
    root = np.asarray(root)
    info = {"finite": bool(np.all(np.isfinite(root)))}
    if not info["finite"]:
        return None, info
    scale = max(float(np.abs(root.real).max()), 1e-300)
    info["max_imag_rel"] = float(np.abs(root.imag).max() / scale) if np.iscomplexobj(root) else 0.0
    norm_a = max(float(np.linalg.norm(a)), 1e-300)
    info["residual_rel"] = float(np.linalg.norm(root @ root - a) / norm_a)
    ok = info["max_imag_rel"] <= IMAG_TOL and info["residual_rel"] <= RESIDUAL_TOL
    return (root.real if ok else None), info


def _trace_sqrt_product_lowrank(s1: np.ndarray, features2: np.ndarray) -> float:
    """tr sqrtm(S1 S2) with S2 = cov(features2) of rank < D, exactly, via the small (N, N) matrix.

    S1 S2 = S1 X^T X / (N - 1) (X centered) has the nonzero eigenvalues of X S1 X^T / (N - 1), symmetric PSD.
    """
    x = np.asarray(features2, np.float64)
    x = x - x.mean(axis=0)
    m = x @ s1 @ x.T / (len(x) - 1)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     features2: np.ndarray | None = None) -> tuple[float, dict]:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); returns (value, info about the sqrtm).

    If ``features2`` (the features sigma2 was computed from) is given and has no more rows than dimensions, sigma2
    is singular (rank <= N - 1) and the trace term is computed exactly through the (N, N) matrix instead.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics have mismatched shapes: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape} (are both from the same feature layer?)")
    if not all(np.all(np.isfinite(x)) for x in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN/inf; the features are broken (check the input images)")
    diff = mu1 - mu2
    if features2 is not None and len(features2) <= mu1.size:
        tr_covmean = _trace_sqrt_product_lowrank(s1, features2)
        info = {"method": "low-rank eigh (N <= D: singular sample covariance, exact)", "offset_eps": 0.0,
                "notes": [f"only {len(features2)} samples for {mu1.size}-d features: the covariance is singular and "
                          f"the FID is strongly biased; use >= 10k samples for reportable numbers"]}
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean), info
    info = {"method": "scipy.linalg.sqrtm", "offset_eps": 0.0, "notes": []}
    root, check = _sqrtm_checked(s1 @ s2)
    info["sqrtm_check"] = check
    if root is None:
        offset = np.eye(s1.shape[0]) * eps
        root, check = _sqrtm_checked((s1 + offset) @ (s2 + offset))
        info.update(offset_eps=eps, sqrtm_check_offset=check)
        info["notes"].append(f"sqrtm(S1 S2) was unreliable ({_describe(info['sqrtm_check'])}); added {eps}*I to both "
                             f"covariances (ADM's fallback)")
    tr_eig = _trace_sqrt_product_eig(s1, s2)
    info["trace_sqrtm_eig"] = tr_eig
    if root is None:
        info["method"] = "eigh (symmetric form)"
        info["notes"].append(f"sqrtm still unreliable ({_describe(check)}); used the exact symmetric eigenvalue form")
        tr_covmean = tr_eig
    else:
        tr_covmean = float(np.trace(root))
        info["trace_sqrtm"] = tr_covmean
        scale = max(abs(tr_eig), float(np.trace(s1) + np.trace(s2)) * 1e-12, 1e-300)
        if abs(tr_covmean - tr_eig) > 1e-3 * scale:
            info["notes"].append(f"sqrtm trace {tr_covmean:.6g} disagrees with the eigenvalue form {tr_eig:.6g}")
            warnings.warn(info["notes"][-1], RuntimeWarning, stacklevel=2)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return value, info


def _describe(check: dict) -> str:
    if not check.get("finite", True):
        return "non-finite values"
    return f"max |imag|/|real| = {check.get('max_imag_rel', 0):.2g}, residual = {check.get('residual_rel', 0):.2g}"


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's IS: softmax of the (bias-free) logits, mean over splits of exp(mean_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p = torch.softmax(logits, dim=1).numpy()
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part + 1e-300) - np.log(part.mean(axis=0, keepdims=True) + 1e-300))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features: np.ndarray, k: int = 3, batch: int = 10000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour (the point itself is the 0-th)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors, got {len(f)}")
    radii = []
    for i in range(0, len(f), batch):
        d = _sq_dists(f[i:i + batch], f)
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(radii).numpy()


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    inside = torch.zeros(len(points), dtype=torch.bool)
    for i in range(0, len(points), batch):
        for j in range(0, len(centers), batch):
            d = _sq_dists(points[i:i + batch], centers[j:j + batch])
            inside[i:i + batch] |= (d <= radii[j:j + batch][None]).any(dim=1)
    return float(inside.double().mean())


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     batch: int = 10000) -> tuple[float, float]:
    """(precision, recall) of samples against references with k-NN manifolds (see the module docstring)."""
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float64)
    smp = torch.as_tensor(np.asarray(sample_features), dtype=torch.float64)
    r_ref = torch.as_tensor(manifold_radii(ref.numpy(), k, batch))
    r_smp = torch.as_tensor(manifold_radii(smp.numpy(), k, batch))
    return _coverage(smp, ref, r_ref, batch), _coverage(ref, smp, r_smp, batch)
