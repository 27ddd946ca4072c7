"""Distributed generation: per-index noise and labels, batched solving, decoding, PNGs, npz, JSON, grid.

Reproducibility protocol (differs from the reference on purpose, see below):

* sample ``i``'s initial noise is ``torch.randn(C, H', W')`` (float32, CPU) from a generator seeded by
  ``(global_seed, i, stream 0)``; its label (``uniform``) is drawn from ``(global_seed, i, stream 1)``; its SDE
  noise, one float64 draw per step, from ``(global_seed, i, stream 2)``. The three 63-bit seeds come from
  ``numpy.random.SeedSequence([global_seed, i, stream])``. So a sample depends only on its index and the seed,
  not on the number of processes, the batch size, the batch it lands in, or whether the run was resumed.
* The reference instead seeds each rank with ``global_seed * world + rank`` and draws the whole batch from that
  rank's CUDA stream, so its samples change with the world size and batch size. Bitwise reproduction of a
  reference ``.npz`` is therefore not a goal; the distribution (and FID protocol) is the same.
* Float32 matrix kernels may round differently for different batch sizes (GEMM blocking), so images produced
  with different ``--per-proc-batch-size`` can differ by rounding (an occasional 1-LSB pixel); with the same
  batch size they are bitwise identical for any number of processes on the same hardware.

Labels: ``uniform`` (the reference protocol: i.i.d. uniform over the classes) or ``balanced`` (sample ``i`` gets
``classes[i % K]``, so every class gets ``N // K`` or ``N // K + 1`` images, exactly equal when K divides N).
``class_ids`` restricts either to a subset. Per-class counts are recorded in the output JSON.

Pixels: ``clamp(255 * (x + 1) / 2, 0, 255)`` cast to uint8, i.e. truncation as in the reference generate.py
(DiT rounds instead; truncation is kept so FIDs are comparable with REPA's).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from repa.shards import dist as _dist
from repa.shards.lock import LOCK_NAME, LockHeld, OutputLock

from .npz import atomic_write_bytes, is_temp_name, make_grid, read_png, save_png, write_images_npz
from .solvers import euler_maruyama_sampler, euler_sampler

__all__ = ["SamplingSpec", "sample_generator", "initial_noise", "make_labels", "LatentDecoder", "generate_pngs",
           "finalize_outputs", "png_path", "DistInfo", "init_distributed", "barrier"]

STREAM_NOISE, STREAM_LABEL, STREAM_SDE = 0, 1, 2


@dataclass
class SamplingSpec:
    """Everything that determines the images (recorded in the JSON; must match to resume a folder)."""
    num_samples: int
    mode: str = "ode"
    num_steps: int = 50
    cfg_scale: float = 1.5
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    heun: bool = False
    path_type: str = "linear"
    global_seed: int = 0
    label_sampling: str = "uniform"
    class_ids: list[int] | None = None
    num_classes: int = 1000
    null_class: int = 1000
    latent_shape: list[int] = field(default_factory=lambda: [4, 32, 32])

    def validate(self) -> None:
        if self.mode not in ("ode", "sde"):
            raise ValueError(f"--mode must be ode or sde, got {self.mode!r}")
        if self.num_samples < 1:
            raise ValueError(f"--num-fid-samples must be >= 1, got {self.num_samples}")
        if self.num_steps < 1:
            raise ValueError(f"--num-steps must be >= 1, got {self.num_steps}")
        if self.guidance_low > self.guidance_high:
            raise ValueError(f"--guidance-low {self.guidance_low} is above --guidance-high {self.guidance_high}: "
                             "guidance would never be active; give low <= high (the interval of t where CFG "
                             "applies, default 0 to 1)")
        if self.cfg_scale < 1.0:
            raise ValueError(f"--cfg-scale must be >= 1 (1 = no guidance), got {self.cfg_scale}")
        if self.label_sampling not in ("uniform", "balanced"):
            raise ValueError(f"--label-sampling must be uniform or balanced, got {self.label_sampling!r}")
        if self.path_type not in ("linear", "cosine"):
            raise ValueError(f"--path-type must be linear or cosine, got {self.path_type!r}")
        if self.class_ids is not None:
            bad = [c for c in self.class_ids if not 0 <= c < self.num_classes]
            if bad or not self.class_ids:
                raise ValueError(f"--class-ids: {bad or 'empty'} outside [0, {self.num_classes}) for this model")


def _seed(global_seed: int, index: int, stream: int) -> int:
    state = np.random.SeedSequence([int(global_seed), int(index), int(stream)]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def sample_generator(global_seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for (seed, sample index, stream); see the module docstring."""
    return torch.Generator().manual_seed(_seed(global_seed, index, stream))


def initial_noise(indices, global_seed: int, shape) -> torch.Tensor:
    """(len(indices), *shape) float32 initial noise, one generator per global sample index."""
    return torch.stack([torch.randn(tuple(shape), generator=sample_generator(global_seed, i, STREAM_NOISE))
                        for i in indices])


def make_labels(num: int, global_seed: int, num_classes: int, class_ids=None,
                label_sampling: str = "uniform") -> np.ndarray:
    """int64 (num,) labels of samples 0..num-1 (independent of how they are split into batches/processes)."""
    classes = np.asarray(class_ids if class_ids else range(num_classes), dtype=np.int64)
    if label_sampling == "balanced":
        return classes[np.arange(num) % len(classes)]
    if label_sampling != "uniform":
        raise ValueError(f"--label-sampling must be uniform or balanced, got {label_sampling!r}")
    k = len(classes)
    picks = [int(torch.randint(k, (1,), generator=sample_generator(global_seed, i, STREAM_LABEL))) for i in range(num)]
    return classes[np.asarray(picks, dtype=np.int64)]


class LatentDecoder:
    """Scaled latents -> uint8 NHWC images: ``vae.decode((z - bias) / scale)``, then the reference quantization."""

    def __init__(self, vae, scale, bias, device):
        self.vae = vae
        self.scale = torch.tensor(scale, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.bias = torch.tensor(bias, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> np.ndarray:
        z = z.to(self.scale.device, torch.float32)
        x = self.vae.decode((z - self.bias) / self.scale)
        x = (x + 1) / 2.0
        x = torch.clamp(255.0 * x, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
        return x.numpy()


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group set up by torchrun / accelerate launch (env RANK, WORLD_SIZE), if any.

    The group comes from the one distributed context of every stage (``repa.shards.dist``): nccl on CUDA,
    gloo on CPU; each process uses cuda:LOCAL_RANK when CUDA is available.
    """
    env = _dist.from_env()
    if device is None:
        dev = torch.device(f"cuda:{env.local_rank % torch.cuda.device_count()}") if torch.cuda.is_available() else \
            torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started = env.world_size > 1 and not torch.distributed.is_initialized()
    _dist.init(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(env.rank, env.world_size, env.local_rank, dev, initialized_here=started)


def barrier(info: DistInfo) -> None:
    _dist.context().barrier()


def _broadcast(obj, info: DistInfo):
    return _dist.context().broadcast(obj)


def png_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index:06d}.png")


def pending_indices(folder: str, num: int, info: DistInfo) -> list[int]:
    """Indices whose PNG does not exist yet (scanned once on rank 0, shared with all ranks)."""
    todo = None
    if info.rank == 0:
        existing = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        todo = [i for i in range(num) if f"{i:06d}.png" not in existing]
    return _broadcast(todo, info)


FOLDER_FORMAT = "repa-sample-folder/1"  # marks a sampling.json (and so its folder) as written by repa-sample
RECORD = "sampling.json"


class FolderRefused(ValueError):
    """The sample folder cannot be used: not ours, made with other settings, or held by another run."""


def _not_ours(folder: str) -> str | None:
    """Why an existing ``folder`` is not a repa-sample folder we may resume (None if it is ours or empty)."""

    names = sorted(n for n in os.listdir(folder) if n != LOCK_NAME)
    record = os.path.join(folder, RECORD)
    if os.path.isfile(record):
        try:
            with open(record) as f:
                old = json.load(f)
        except (ValueError, OSError):
            old = None
        if isinstance(old, dict) and old.get("format") == FOLDER_FORMAT:
            return None
        return f"{record} was not written by repa-sample"
    if names:
        return (f"it exists, holds files not written by repa-sample ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}) and no {RECORD} of ours")
    return None


def _settings_differ(folder: str, identity: dict) -> str | None:
    """None if the folder's record equals ``identity``; else which settings differ."""
    path = os.path.join(folder, RECORD)
    with open(path) as f:
        old = json.load(f)
    new = json.loads(json.dumps(identity))
    if old == new:
        return None
    diff = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [f"{k}.{j}" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
        elif a != b:
            diff.append(k)
    return (f"{folder}: holds samples made with different settings ({', '.join(diff)} differ, see {path}); "
            f"use another --sample-dir or delete that folder")


def _remove_our_temp_files(folder: str) -> None:
    """Temp files of killed runs: any in our folder, and those of our npz/json/grid beside it. Never read
    (PNGs are found by their final names); other files, however named, are not touched."""
    for name in os.listdir(folder):
        if is_temp_name(name):
            os.remove(os.path.join(folder, name))
    parent, base = os.path.split(os.path.abspath(folder))
    ours = {f"{base}.npz", f"{base}.json", f"{base}-grid.png"}
    for name in os.listdir(parent):
        if any(is_temp_name(name, of=o) for o in ours):
            os.remove(os.path.join(parent, name))


def _claim_folder(folder: str, identity: dict):
    """Rank 0: lock the folder, then check and write its record under the lock. Returns the held lock."""

    why = _not_ours(folder) if os.path.isdir(folder) else None  # before the lock: add nothing to others' folders
    if why:
        raise FolderRefused(f"{folder}: {why}; refusing to write into it. Use another --sample-dir, or move "
                            f"those files away")
    os.makedirs(folder, exist_ok=True)
    lock = OutputLock(folder, stage="repa-sample")
    try:
        lock.acquire()
    except LockHeld as e:
        raise FolderRefused(f"{folder}: {e}") from None
    try:
        if lock.previous:
            print(f"repa-sample: warning: took over the lock of a run that did not finish: {lock.previous}",
                  file=sys.stderr)
        why = _not_ours(folder)  # again, now that no other run can write
        if why:
            raise FolderRefused(f"{folder}: {why}; refusing to write into it. Use another --sample-dir")
        if os.path.isfile(os.path.join(folder, RECORD)):
            err = _settings_differ(folder, identity)
            if err:
                raise FolderRefused(err)
        else:
            atomic_write_bytes(os.path.join(folder, RECORD), json.dumps(identity, indent=2, sort_keys=True).encode())
        _remove_our_temp_files(folder)
    except BaseException:
        lock.release()
        raise
    return lock


def prepare_folder(folder: str, identity: dict, info: DistInfo):
    """Create or resume the sample folder (rank 0 locks it; the other ranks wait). Returns rank 0's lock.

    Refused (FolderRefused on every rank): a folder that is not ours, one recorded with other settings or
    another checkpoint (identity: experiment, step, weights hash), or one another run is writing.
    """
    identity = dict(identity, format=FOLDER_FORMAT)
    err, lock = None, None
    if info.rank == 0:
        try:
            lock = _claim_folder(folder, identity)
        except FolderRefused as e:
            err = str(e)
    err = _broadcast(err, info)  # also the sync point: no rank writes before rank 0 has cleaned up
    if err:
        raise FolderRefused(err)
    return lock


class StopSignals:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C) and SIGUSR1 (SLURM's warning before a requeue) ask the run to stop:
    the batch in flight is abandoned, finished PNGs are kept, and a rerun resumes. A second signal of the same
    kind acts as it would without us (so a second Ctrl-C interrupts at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self.previous = {}

    def install(self) -> "StopSignals":
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (a notebook worker): no pre-emption handling
                pass
        return self

    def _handler(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class _Stopped(Exception):
    pass


class _StopGuard:
    """The model, refusing to run once a stop was requested: abandons a batch within one model call."""

    def __init__(self, model, stop: StopSignals | None):
        self.module, self.stop = model, stop  # ``module``: the solvers find the SiT (null class) through it

    def __call__(self, *args, **kwargs):
        if self.stop is not None and self.stop.received:
            raise _Stopped
        return self.module(*args, **kwargs)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any (one collective call per rank)."""
    if info.world == 1 or not torch.distributed.is_initialized():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=info.device if info.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _solve(model, spec: SamplingSpec, idx: list[int], labels: np.ndarray, device) -> torch.Tensor:
    """Latents of samples ``idx``: per-index noise (and SDE noise), then the ODE/SDE solver."""
    kw = dict(num_steps=spec.num_steps, cfg_scale=spec.cfg_scale, guidance_low=spec.guidance_low,
              guidance_high=spec.guidance_high, path_type=spec.path_type, null_class=spec.null_class)
    z = initial_noise(idx, spec.global_seed, spec.latent_shape).to(device)
    y = torch.from_numpy(labels[idx]).to(device)
    if spec.mode == "sde":
        gens = [sample_generator(spec.global_seed, i, STREAM_SDE) for i in idx]
        return euler_maruyama_sampler(model, z, y, noise_generators=gens, **kw)
    return euler_sampler(model, z, y, heun=spec.heun, **kw)


@torch.no_grad()
def generate_pngs(model, decoder: LatentDecoder, spec: SamplingSpec, folder: str, labels: np.ndarray,
                  info: DistInfo, batch_size: int, progress: bool = True, stop: StopSignals | None = None) -> int:
    """Generate this rank's share of the missing samples of ``folder``; returns how many PNGs it wrote.

    Once ``stop.received`` is set, the batch in flight is abandoned at its next model call (its samples are
    simply not written), the PNGs already handed to the writer threads are finished, and the function returns.
    """
    todo = pending_indices(folder, spec.num_samples, info)
    mine = todo[info.rank::info.world]
    batches = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    it = batches
    if progress and info.rank == 0 and batches:
        from tqdm.auto import tqdm
        it = tqdm(batches, desc=f"sampling ({len(todo)} to go on {info.world} proc)", unit="batch")
    guarded = _StopGuard(model, stop)
    futures = []
    with ThreadPoolExecutor(max_workers=2) as pool:  # PNG encoding releases the GIL: overlap it with sampling
        for idx in it:
            try:
                out = _solve(guarded, spec, idx, labels, info.device)
            except _Stopped:
                break
            images = decoder(out.to(torch.float32))
            futures += [pool.submit(save_png, png_path(folder, i), img) for i, img in zip(idx, images)]
            for f in [f for f in futures if f.done()]:
                f.result()
        for f in futures:
            f.result()
    return len(futures)


def finalize_outputs(folder: str, spec: SamplingSpec, labels: np.ndarray, record: dict,
                     progress: bool = True) -> str:
    """Rank 0: PNGs -> ``{folder}.npz`` (arr_0 uint8 NHWC, arr_1 labels), ``{folder}.json``, ``{folder}-grid.png``."""
    missing = [i for i in range(spec.num_samples) if not os.path.isfile(png_path(folder, i))]
    if missing:
        raise RuntimeError(f"{folder}: {len(missing)} PNGs missing (e.g. {png_path(folder, missing[0])}); "
                           f"rerun the same command to resume")
    first = read_png(png_path(folder, 0))
    npz_path = folder.rstrip(os.sep) + ".npz"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        def bar(it):
            return tqdm(it, desc="writing npz", unit="img", total=spec.num_samples)
    write_images_npz(npz_path, spec.num_samples, first.shape, lambda i: read_png(png_path(folder, i)),
                     labels=labels, progress=bar)
    grid_n = min(spec.num_samples, 64)
    grid = make_grid(np.stack([read_png(png_path(folder, i)) for i in range(grid_n)]), nrow=8)
    save_png(folder.rstrip(os.sep) + "-grid.png", grid)
    counts = np.bincount(labels, minlength=spec.num_classes)
    record = dict(record)
    record.update({
        "npz": os.path.abspath(npz_path), "npz_keys": {"arr_0": "uint8 (N, H, W, 3) NHWC", "arr_1": "int64 labels"},
        "num_samples": spec.num_samples, "image_shape": list(first.shape), "sample_folder": os.path.abspath(folder),
        "grid": os.path.abspath(folder.rstrip(os.sep) + "-grid.png"), "sampling": asdict(spec),
        "class_counts": {str(c): int(n) for c, n in enumerate(counts) if n},
        "noise_protocol": "per global index: SeedSequence([global_seed, index, stream]); streams 0 noise, "
                          "1 label, 2 SDE noise (independent of process count and batch composition)",
        "pixel_quantization": "clamp(255*(x+1)/2, 0, 255).to(uint8) (truncation, as the reference generate.py)",
    })
    atomic_write_bytes(folder.rstrip(os.sep) + ".json", json.dumps(record, indent=2, sort_keys=True).encode())
    return npz_path


def spec_identity(spec: SamplingSpec, extra: dict) -> dict:
    """The part of the settings that must match for a folder to be resumed."""
    d = asdict(spec)
    d.update(extra)
    return d

