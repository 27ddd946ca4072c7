"""The demo's pretrained teacher: a small timm ViT trained on the embedded digits, saved in timm's folder format.

REPA aligns the student with a *frozen pretrained* encoder. The demo has no network, so it cannot download
DINOv2; instead it builds one once, here, from the data that ships with scikit-learn:

1. images: the `digits` source of repa-preprocess (1,797 8x8 digits, 10 classes) through the same ADM center
   crop at the demo resolution R (default 32), as uint8;
2. split: a seeded permutation cuts the set into two halves (`split_halves`). The teacher trains on half A
   and reports its accuracy on half B. bench/digits_judge.py trains its independent judge on half B;
3. model: ``timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=..., patch_size=...,
   embed_dim=..., depth=..., num_classes=10, class_token=False, global_pool="avg")``: a 4-block ViT whose
   classification reads the mean of its patch tokens, so every output patch token is trained (a CLS
   token's last block would leave the patch outputs untrained, and those are what REPA aligns to);
4. input: exactly what repa-preprocess will feed it. The images go through `preprocess.teachers.Teacher`'s
   own `preprocess` (x/255, mean/std from the model's pretrained_cfg, bicubic resize to patch * R/16), so the
   token grid is (R/16) x (R/16), as for every teacher of the pipeline;
5. training: AdamW with a cosine schedule, label smoothing, random translations of up to 2 px
   (at R=32; one quarter of a source pixel per px), seeded (`--seed`), for a fixed number of steps
   (about 20 s on 2 idle CPU cores);
6. saving: `timm.models.save_for_hf(model, dir, safe_serialization=True)` writes config.json +
   model.safetensors, the folder format that `--enc-type timm:local-dir:DIR` loads; the held-out accuracy
   measured on the *reloaded* folder and the recipe go to `demo_teacher.json` next to them.

The folder is cached (default ``$REPA_CACHE or ~/.cache/repa``/demo-teacher-<hash of the recipe>) and reused
when present; the write is atomic (temporary folder, then rename).

    python -m repa.preprocess.demo_teacher --out ~/.cache/repa      # prints the teacher folder
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TeacherRecipe", "digits_images", "split_halves", "build_teacher", "ensure_teacher",
           "evaluate_folder", "teacher_dir_name"]

INFO_FILE = "demo_teacher.json"


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    """Everything that determines the teacher's weights (its hash names the cache folder)."""
    resolution: int = 32      # dataset resolution R (the demo's --res); the token grid is R/16 per side
    patch_size: int = 8       # teacher input = patch_size * R/16 (16 px at R=32)
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 2        # random translation in pixels at resolution R
    seed: int = 0
    split_seed: int = 1234    # the A/B split shared with the judge (bench/digits_judge.py)

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def teacher_dir_name(recipe: TeacherRecipe) -> str:
    return f"demo-teacher-{recipe.key()}"


def default_cache_root() -> str:
    return os.environ.get("REPA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "repa")


@functools.lru_cache(maxsize=2)
def digits_images(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as repa-preprocess sees them: uint8 (N, 3, R, R) after the ADM crop, int64 labels.

    Cached per resolution: treat the returned tensors as read-only."""
    from repa.preprocess.crop import adm_center_crop
    from repa.preprocess.sources import DigitsSource

    src = DigitsSource()
    images, labels = [], []
    for key in range(len(src)):
        img, label, _ = src.decode(src.get(key))
        images.append(adm_center_crop(img, resolution))
        labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def split_halves(n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint halves (A, B) of range(n): the teacher trains on A, the judge on B."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2].sort().values, perm[n // 2:].sort().values


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each uint8 image by up to ``max_shift`` px in x and y, filling with black (the background)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _create_vit(recipe: TeacherRecipe, input_size: int):
    import timm
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=input_size, patch_size=recipe.patch_size,
        embed_dim=recipe.embed_dim, depth=recipe.depth, num_heads=recipe.num_heads, num_classes=10,
        class_token=False, global_pool="avg")


def _pipeline_view(model, recipe: TeacherRecipe):
    """The repa-preprocess `Teacher` wrapper around `model` (used for its input preprocessing only)."""
    from repa.preprocess.teachers import Teacher, _Recipe
    cfg = model.pretrained_cfg
    view = Teacher(model, name="demo-teacher", model_id=None, resolution=recipe.resolution,
                   recipe=_Recipe(tuple(cfg["mean"]), tuple(cfg["std"]), "custom"))
    model.requires_grad_(True)  # Teacher freezes its model; we are still training it
    return view


@torch.no_grad()
def _accuracy(model, view, images, labels, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(view.preprocess(images[i:i + batch]))
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / max(1, len(images))


def build_teacher(out_dir: str, recipe: TeacherRecipe = TeacherRecipe(), *, log=print) -> dict:
    """Train the teacher per ``recipe`` and save it (timm folder format) to ``out_dir``; returns its info dict."""
    from repa.preprocess.teachers import teacher_input_size
    from timm.models import save_for_hf

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    images, labels = digits_images(recipe.resolution)
    train_idx, held_idx = split_halves(len(images), recipe.split_seed)
    input_size = teacher_input_size(recipe.patch_size, recipe.resolution)
    model = _create_vit(recipe, input_size)
    view = _pipeline_view(model, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 25) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    gen = torch.Generator().manual_seed(recipe.seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    model.train()
    for step in range(recipe.steps):
        idx = torch.randint(len(x_train), (recipe.batch_size,), generator=gen)
        x = view.preprocess(random_shift(x_train[idx], recipe.max_shift, gen))
        loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=recipe.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % max(1, recipe.steps // 5) == 0:
            log(f"demo teacher: step {step + 1}/{recipe.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    train_seconds = time.perf_counter() - t0

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-teacher-", dir=parent)
    try:
        model.eval()
        save_for_hf(model, tmp, safe_serialization=True)
        held = evaluate_folder(tmp, images[held_idx], labels[held_idx], recipe.resolution)
        train_acc = evaluate_folder(tmp, x_train, y_train, recipe.resolution)
        info = {
            "recipe": dataclasses.asdict(recipe), "input_size": input_size,
            "token_grid": [recipe.resolution // 16] * 2, "num_train": len(train_idx), "num_heldout": len(held_idx),
            "train_accuracy": train_acc, "heldout_accuracy": held, "train_seconds": round(train_seconds, 1),
            "params": sum(p.numel() for p in model.parameters()),
            "how": "timm vit_tiny_patch16_224 architecture (random init, class_token=False, global_pool=avg) "
                   "trained on split half A of scikit-learn's digits at the demo crop; see "
                   "preprocess/demo_teacher.py",
        }
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.isdir(out_dir):  # a concurrent builder won: keep theirs (same recipe, same weights)
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"demo teacher: held-out accuracy {held:.3f} (train {train_acc:.3f}) on {len(held_idx)} images, "
            f"{train_seconds:.0f} s -> {out_dir}")
    return info


@torch.no_grad()
def evaluate_folder(folder: str, images: torch.Tensor, labels: torch.Tensor, resolution: int) -> float:
    """Accuracy of the saved classifier ``folder`` (loaded the way users load it: timm local-dir)."""
    import timm
    model = timm.create_model(f"local-dir:{os.path.abspath(folder)}", pretrained=True).eval()
    recipe = TeacherRecipe(resolution=resolution, patch_size=model.patch_embed.patch_size[0])
    view = _pipeline_view(model, recipe)
    return _accuracy(model, view, images, labels)


def ensure_teacher(cache_root: str | None = None, recipe: TeacherRecipe = TeacherRecipe(), *, log=print) -> str:
    """The teacher folder for ``recipe`` under ``cache_root``: reused if present, else built. Returns its path."""
    root = cache_root or default_cache_root()
    out = os.path.join(root, teacher_dir_name(recipe))
    if os.path.isfile(os.path.join(out, INFO_FILE)) and os.path.isfile(os.path.join(out, "model.safetensors")):
        if log:
            with open(os.path.join(out, INFO_FILE)) as f:
                acc = json.load(f).get("heldout_accuracy")
            log(f"demo teacher: reusing {out} (held-out accuracy {acc:.3f})")
        return out
    build_teacher(out, recipe, log=log)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repa.preprocess.demo_teacher", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="cache root; the teacher goes to <out>/demo-teacher-<hash> "
                                               "[default: $REPA_CACHE or ~/.cache/repa]")
    d = TeacherRecipe()
    for f in dataclasses.fields(TeacherRecipe):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = vars(p.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    out = args.pop("out")
    recipe = TeacherRecipe(**args)
    path = ensure_teacher(out, recipe, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
