"""The demo's pretrained teacher: a small timm ViT trained on half of a dataset, saved in timm's folder format.

REPA aligns the student with a *frozen pretrained* encoder. The demo has no network, so it cannot download
DINOv2; instead it builds one once, here, from the data at hand (by default the digits that ship with
scikit-learn; ``--source`` takes anything repa-preprocess accepts: ``digits``, ``imagefolder:DIR``, ``hf:...``):

1. images: the source through repa-preprocess's own reader and ADM center crop at the resolution R (default
   64), as uint8 (`source_images`);
2. split: a seeded permutation cuts the set into two halves (`split_halves`). The teacher trains on half A
   and reports its accuracy on half B. sampler/digits_judge.py trains its independent judge on half B;
3. model: ``timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=..., patch_size=...,
   embed_dim=..., depth=..., num_classes=K, class_token=False, global_pool="avg")``: a 4-block ViT whose
   classification reads the mean of its patch tokens, so every output patch token is trained (a CLS
   token's last block would leave the patch outputs untrained, and those are what REPA aligns to);
4. input: exactly what repa-preprocess will feed it. The images go through `preprocess.teachers.Teacher`'s
   own `preprocess` (x/255, mean/std from the model's pretrained_cfg, bicubic resize to patch * R/16), so the
   token grid is (R/16) x (R/16), as for every teacher of the pipeline. The default (R=64, patch 2) gives an
   8 px input (the digits' native resolution) and a 4x4 grid: the grid of the demo's pixel-space SiT with
   patch 16 (each token one 16x16 px patch, like SiT-/2 on the 256 px SD-VAE latent with DINOv2's 16x16);
5. training: AdamW with a cosine schedule, label smoothing, random translations of up to ``max_shift`` px
   (at R), seeded (`--seed`), for a fixed number of steps (about a minute on 2 idle CPU cores);
6. saving: `timm.models.save_for_hf(model, dir, safe_serialization=True)` writes config.json +
   model.safetensors, the folder format that `--enc-type timm:local-dir:DIR` loads; the held-out accuracy
   measured on the *reloaded* folder and the recipe go to `demo_teacher.json` next to them.

The folder is cached (default ``$REPA_CACHE or ~/.cache/repa``/demo-teacher-<hash of the recipe>) and reused
when present; the write is atomic (temporary folder, then rename). The hash covers the recipe, including the
source *name* (not the files of an image folder: give a changed folder a new path or a new ``--seed``).

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

from repa.preprocess.crop import adm_center_crop
from repa.preprocess.sources import open_source
from repa.preprocess.teachers import Teacher, _Recipe, teacher_input_size

__all__ = ["TeacherRecipe", "digits_images", "source_images", "split_halves", "build_teacher", "ensure_teacher",
           "evaluate_folder", "teacher_dir_name", "VAERecipe", "build_vae", "ensure_vae"]

INFO_FILE = "demo_teacher.json"


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    """Everything that determines the teacher's weights (its hash names the cache folder)."""
    resolution: int = 64      # dataset resolution R (the demo's --res); the token grid is R/16 per side
    patch_size: int = 2       # teacher input = patch_size * R/16 (8 px at R=64)
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 2        # random translation in pixels at resolution R (a quarter digit pixel at R=64)
    seed: int = 0
    split_seed: int = 1234    # the A/B split shared with the judge (sampler/digits_judge.py)
    source: str = "digits"    # anything repa-preprocess accepts: digits, imagefolder:DIR, hf:NAME

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def teacher_dir_name(recipe: TeacherRecipe) -> str:
    return f"demo-teacher-{recipe.key()}"


def default_cache_root() -> str:
    return os.environ.get("REPA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "repa")


@functools.lru_cache(maxsize=4)
def _source_images(source: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor, int]:

    src = open_source(source, res=resolution)
    images, labels = [], []
    for _key, record in src.stream(0):
        img, label, _ = src.decode(record)
        images.append(adm_center_crop(img, resolution))
        labels.append(label)
    if len(images) < 4:
        raise ValueError(f"{source}: {len(images)} images; the teacher/judge split needs at least 4")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64), int(src.num_classes)


def source_images(source: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All images of ``source`` as repa-preprocess sees them (its reader, its ADM crop at ``resolution``):
    uint8 (N, 3, R, R), int64 labels in key order, and the number of classes.

    Cached per (source, resolution): treat the returned tensors as read-only. Held in memory: meant for the
    demo and bench datasets (thousands of images), not ImageNet."""
    return _source_images(source, int(resolution))


def digits_images(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: uint8 (N, 3, R, R) after the ADM crop, int64 labels (`source_images("digits", R)`)."""
    x, y, _ = source_images("digits", resolution)
    return x, y


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


def _create_vit(recipe: TeacherRecipe, input_size: int, num_classes: int):
    import timm
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=input_size, patch_size=recipe.patch_size,
        embed_dim=recipe.embed_dim, depth=recipe.depth, num_heads=recipe.num_heads, num_classes=num_classes,
        class_token=False, global_pool="avg")


def _pipeline_view(model, recipe: TeacherRecipe):
    """The repa-preprocess `Teacher` wrapper around `model` (used for its input preprocessing only)."""
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


def _update(opt, sched, loss) -> None:
    """One optimiser step of the demo models' training loops."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def _progress(log, what: str, step: int, steps: int, loss, t0: float, digits: int) -> None:
    """Five progress lines per training run."""
    if log and (step + 1) % max(1, steps // 5) == 0:
        log(f"{what}: step {step + 1}/{steps} loss {loss.item():.{digits}f} ({time.perf_counter() - t0:.0f} s)")


def build_teacher(out_dir: str, recipe: TeacherRecipe = TeacherRecipe(), *, log=print) -> dict:
    """Train the teacher per ``recipe`` and save it (timm folder format) to ``out_dir``; returns its info dict."""
    from timm.models import save_for_hf

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    images, labels, num_classes = source_images(recipe.source, recipe.resolution)
    train_idx, held_idx = split_halves(len(images), recipe.split_seed)
    input_size = teacher_input_size(recipe.patch_size, recipe.resolution)
    model = _create_vit(recipe, input_size, num_classes)
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
        _update(opt, sched, loss)
        _progress(log, "demo teacher", step, recipe.steps, loss, t0, digits=3)
    train_seconds = time.perf_counter() - t0

    def write(tmp):  # save, then measure the saved folder the way preprocessing will load it
        model.eval()
        save_for_hf(model, tmp, safe_serialization=True)
        return {"train_accuracy": evaluate_folder(tmp, x_train, y_train, recipe.resolution),
                "heldout_accuracy": evaluate_folder(tmp, images[held_idx], labels[held_idx], recipe.resolution)}

    info = {
        "recipe": dataclasses.asdict(recipe), "input_size": input_size,
        "token_grid": [recipe.resolution // 16] * 2, "num_train": len(train_idx), "num_heldout": len(held_idx),
        "train_seconds": round(train_seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "num_classes": num_classes,
        "how": "timm vit_tiny_patch16_224 architecture (random init, class_token=False, global_pool=avg) "
               f"trained on split half A of {recipe.source} at the ADM crop; see preprocess/demo_teacher.py",
    }
    _save_folder(out_dir, write, info, INFO_FILE, prefix=".tmp-teacher-")
    held, train_acc = info["heldout_accuracy"], info["train_accuracy"]
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


# ------------------------------------------------------------------ the demo's autoencoder

@dataclasses.dataclass(frozen=True)
class VAERecipe:
    """A tiny diffusers AutoencoderKL (downsample 8, 4 latent channels, like the SD-VAE) for the demo data.

    Why: the teacher grid is R/16 per side, so in pixel space the student would need patch 16: 768 numbers
    per token, more than a small SiT's width can carry (its output layer has rank <= width, so the noise
    outside that range is never removed). With an 8x latent, SiT-/2 sees (R/16)^2 tokens of 2*2*4 = 16 numbers,
    the ImageNet geometry (256 px -> 32x32x4 latent -> 16x16 tokens = DINOv2's grid)."""
    resolution: int = 64
    block_out_channels: tuple = (8, 16, 32, 32)
    latent_channels: int = 4
    steps: int = 500
    batch_size: int = 16
    crop: int = 32            # trained on random crops (offsets on the 8 px latent grid): a 4x cheaper step
    learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0
    source: str = "digits"

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _create_vae(recipe: VAERecipe):
    from diffusers import AutoencoderKL
    n = len(recipe.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=recipe.block_out_channels,
                         layers_per_block=1, latent_channels=recipe.latent_channels, norm_num_groups=8,
                         sample_size=recipe.resolution, mid_block_add_attention=False)  # all-conv: crops are exact


def build_vae(out_dir: str, recipe: VAERecipe = VAERecipe(), *, log=print) -> dict:
    """Train the autoencoder on ALL images of the source (it is the data's codec, like the SD-VAE for
    ImageNet, not a feature extractor) and save it with save_pretrained; per-channel latents_mean/std of the
    training latents go into its config, so that repa-preprocess scales latents to unit variance."""
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    images, _, _ = source_images(recipe.source, recipe.resolution)
    x_all = images.float() / 127.5 - 1.0
    vae = _create_vae(recipe)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 25) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    gen = torch.Generator().manual_seed(recipe.seed)
    vae.train()
    c, r = min(recipe.crop, recipe.resolution), recipe.resolution
    for step in range(recipe.steps):
        x = x_all[torch.randint(len(x_all), (recipe.batch_size,), generator=gen)]
        oy, ox = (8 * torch.randint(0, (r - c) // 8 + 1, (2,), generator=gen)).tolist()
        x = x[:, :, oy:oy + c, ox:ox + c]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        loss = F.mse_loss(rec, x) + recipe.kl_weight * post.kl().mean()
        _update(opt, sched, loss)
        _progress(log, "demo vae", step, recipe.steps, loss, t0, digits=4)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i:i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
        rec = torch.cat([vae.decode(means[i:i + 256]).sample for i in range(0, len(means), 256)])
    mse = float(F.mse_loss(rec.clamp(-1, 1), x_all))
    vae.register_to_config(latents_mean=means.mean((0, 2, 3)).tolist(), latents_std=means.std((0, 2, 3)).tolist(),
                           scaling_factor=1.0)
    info = {"recipe": dataclasses.asdict(recipe), "reconstruction_mse": mse, "psnr_db": 10 * math.log10(4 / mse),
            "latent_shape": list(means.shape[1:]), "train_seconds": round(time.perf_counter() - t0, 1),
            "params": sum(p.numel() for p in vae.parameters())}
    _save_folder(out_dir, lambda tmp: vae.save_pretrained(tmp, safe_serialization=True), info, "demo_vae.json")
    if log:
        log(f"demo vae: reconstruction PSNR {info['psnr_db']:.1f} dB, latent {info['latent_shape']}, "
            f"{info['train_seconds']:.0f} s -> {out_dir}")
    return info


def _save_folder(out_dir: str, write, info: dict, info_name: str, prefix: str = ".tmp-vae-") -> None:
    """Atomic folder write: ``write(tmp)`` (its returned dict, if any, joins ``info``), then the info JSON, then
    rename (a concurrent builder with the same recipe may win: keep theirs)."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the cache is shared like any folder
        info.update(write(tmp) or {})
        with open(os.path.join(tmp, info_name), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.isdir(out_dir):
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_vae(cache_root: str | None = None, recipe: VAERecipe = VAERecipe(), *, log=print) -> str:
    """The autoencoder folder for ``recipe`` under ``cache_root``: reused if present, else built."""
    root = cache_root or default_cache_root()
    out = os.path.join(root, f"demo-vae-{recipe.key()}")
    if os.path.isfile(os.path.join(out, "demo_vae.json")):
        if log:
            log(f"demo vae: reusing {out}")
        return out
    build_vae(out, recipe, log=log)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repa.preprocess.demo_teacher", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="cache root; the teacher goes to <out>/demo-teacher-<hash> "
                                               "[default: $REPA_CACHE or ~/.cache/repa]")
    d = TeacherRecipe()
    for f in dataclasses.fields(TeacherRecipe):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2),
                   help="torch CPU threads [default: $OMP_NUM_THREADS, else 2]")
    p.add_argument("--vae", action="store_true", help="build the demo autoencoder (VAERecipe: resolution, "
                                                      "steps, seed, source) instead of the teacher")
    args = vars(p.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    out = args.pop("out")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.pop("vae"):
        keep = {k: args[k] for k in ("resolution", "seed", "source")}
        if args["steps"] != d.steps:
            keep["steps"] = args["steps"]
        path = ensure_vae(out, VAERecipe(**keep), log=say)
    else:
        path = ensure_teacher(out, TeacherRecipe(**args), log=say)
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
