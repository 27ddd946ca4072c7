"""An independent judge of generated digits: a small CNN classifier and the metrics computed with it.

The REPA evidence (bench/repa_effect.py) must not score samples with the teacher the student was aligned to.
This judge is independent of it in data and architecture:

* data: it trains on half B of the source (the digits by default; `preprocess.demo_teacher.split_halves`); the
  teacher trains on half A. Its accuracy is reported on half A;
* architecture: a 3-layer convnet (`DigitsCNN`), not a ViT; it reads the pixels the sampler writes
  (uint8 RGB at the demo resolution), scaled to [-1, 1].

Metrics (`Judge.score`), in the spirit of FID / classifier accuracy:

* `fd`: the Frechet distance between Gaussians fitted to the judge's 64-d penultimate features of the samples
  and of all the real images (1,797 digits): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2);
* `acc`: the fraction of class-conditional samples that the judge assigns to the class they were asked for.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from repa.preprocess.demo_teacher import default_cache_root, random_shift, source_images, split_halves

from . import metrics

__all__ = ["DigitsCNN", "Judge", "frechet_distance", "gaussian_stats", "train_judge", "load_or_train_judge"]


class DigitsCNN(nn.Module):
    """avgpool(to 16x16)-conv(3->32)-conv(32->32)-pool-conv(32->64)-pool-fc(1024->64)-fc(64->10); ReLU between.

    The input is first average-pooled to 16x16 (the digits have 8x8 pixels of information; this keeps the
    judge cheap at any demo resolution).
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.AdaptiveAvgPool2d(16),
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float in [-1, 1]."""
        return images.float() / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def gaussian_stats(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64 of (N, D) features (covariance with the N-1 normalisation, like FID)."""
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2): the FID formula of
    ``repa.sampler.metrics`` (checked matrix square root) on the judge's features."""
    return metrics.frechet_distance(mu1, sigma1, mu2, sigma2)[0]


class Judge:
    """A trained `DigitsCNN` plus the feature statistics of the real digits."""

    def __init__(self, model: DigitsCNN, real_images: torch.Tensor):
        self.model = model.eval()
        self.real_mu, self.real_sigma = gaussian_stats(self.features(real_images))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        return torch.cat([self.model.features(images[i:i + batch]) for i in range(0, len(images), batch)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        return torch.cat([self.model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        """{"fd": Frechet distance to the real digits, "acc": fraction judged as the requested class}."""
        feats = self.features(images)
        mu, sigma = gaussian_stats(feats)
        pred = self.model.head(feats).argmax(1)
        return {"fd": frechet_distance(mu, sigma, self.real_mu, self.real_sigma),
                "acc": float((pred == labels).float().mean())}


def train_judge(images: torch.Tensor, labels: torch.Tensor, *, steps: int = 300, batch_size: int = 128,
                lr: float = 2e-3, seed: int = 0, max_shift: int = 2, num_classes: int = 10,
                log=print) -> DigitsCNN:
    """Train a `DigitsCNN` on uint8 (N, 3, R, R) images with random translations; returns it in eval mode."""

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(random_shift(images[idx], max_shift, gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if log:
        log(f"judge: {steps} steps, loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s")
    return model.eval()


def load_or_train_judge(cache_dir: str, resolution: int, *, steps: int = 300, seed: int = 0,
                        split_seed: int = 1234, source: str = "digits", max_shift: int | None = None,
                        log=print) -> tuple[Judge, dict]:
    """The judge of ``source`` at ``resolution`` (trained on half B, cached as safetensors in ``cache_dir``)
    and its info. The cache holds one judge per source: use one cache_dir per source."""
    from safetensors.torch import load_file, save_file


    images, labels, num_classes = source_images(source, resolution)
    half_a, half_b = split_halves(len(images), split_seed)
    shift = max(1, resolution // 16) if max_shift is None else max_shift  # half a digit pixel
    path = os.path.join(cache_dir, f"judge-r{resolution}-s{steps}-seed{seed}-split{split_seed}-k{num_classes}"
                                   f"-shift{shift}.safetensors")
    if os.path.isfile(path):
        model = DigitsCNN(num_classes)
        model.load_state_dict(load_file(path))
        model.eval()
    else:
        model = train_judge(images[half_b], labels[half_b], steps=steps, seed=seed, max_shift=shift,
                            num_classes=num_classes, log=log)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp"
        save_file(model.state_dict(), tmp)
        os.replace(tmp, path)
    judge = Judge(model, images)
    acc = float((judge.predict(images[half_a]) == labels[half_a]).float().mean())
    real = judge.score(images[half_a], labels[half_a])  # a real-data floor for the metrics
    info = {"heldout_accuracy": acc, "num_train": len(half_b), "num_heldout": len(half_a), "weights": path,
            "real_half_fd": real["fd"], "source": source, "num_classes": num_classes}
    if log:
        log(f"judge: held-out accuracy {acc:.3f} on {len(half_a)} real digits; FD(real half A, all real) "
            f"{real['fd']:.3f}")
    return judge, info


def main(argv=None) -> dict:
    """``python -m repa.sampler.digits_judge --npz SAMPLES.npz``: the judge's FD and class accuracy of repa-sample output
    (labels from the .npz's arr_1); prints one JSON line."""
    import argparse
    import json
    p = argparse.ArgumentParser(description=main.__doc__.split(";")[0])
    p.add_argument("--npz", required=True, help="repa-sample's .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--source", default="digits")
    p.add_argument("--cache", default=None, help="judge cache folder [$REPA_CACHE or ~/.cache/repa]/judge")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    with np.load(args.npz, allow_pickle=False) as z:
        if "arr_1" not in z.files:
            raise SystemExit(f"digits_judge: {args.npz} has no arr_1 labels; sample with repa-sample")
        images = torch.from_numpy(np.ascontiguousarray(z["arr_0"])).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(z["arr_1"].astype(np.int64))
    cache = args.cache or os.path.join(default_cache_root(), "judge")
    judge, info = load_or_train_judge(cache, images.shape[-1], steps=args.steps, source=args.source,
                                      log=lambda m: print(m, file=sys.stderr, flush=True))
    score = judge.score(images, labels)
    out = {"acc": score["acc"], "fd": score["fd"], "num_samples": int(len(images)),
           "judge_heldout_accuracy": info["heldout_accuracy"], "real_half_fd": info["real_half_fd"]}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
