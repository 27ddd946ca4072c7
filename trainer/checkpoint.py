"""Checkpoint directories: atomic save, load, find latest, keep last K.

Layout (read by ``sampler/load.py``; see docs/CONTRACTS.md)::

    <output_dir>/<exp_name>/checkpoints/<step:07d>/
        model.safetensors   ema.safetensors   (keys exactly the SiT state dict / official checkpoint's)
        config.json         {"model": {"name", "kwargs"}, "data": <manifest provenance>,
                             "args": <training flags>, "step": int, "repa_version": str}
        train_state.pt      {"step", "optimizer", "scaler", "world_size", "ranks": [per-rank
                             {"rng": ..., "loader": ...}]}  -- loadable with torch.load(weights_only=True)

A checkpoint is written into ``<step:07d>.tmp-<pid>`` next to its final name and renamed when
complete, so a crash mid-save never leaves a directory that ``latest_checkpoint`` would pick up.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^\d{7,}$")


def checkpoint_root(output_dir: str, exp_name: str) -> str:
    """``<output_dir>/<exp_name>/checkpoints``."""
    return os.path.join(output_dir, exp_name, "checkpoints")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under ``root``, oldest step first (temp dirs ignored)."""
    if not os.path.isdir(root):
        return []
    steps = sorted(int(d) for d in os.listdir(root)
                   if STEP_DIR.match(d) and os.path.isfile(os.path.join(root, d, "train_state.pt")))
    return [os.path.join(root, f"{s:07d}") for s in steps]


def latest_checkpoint(root: str) -> str | None:
    """Newest complete checkpoint directory under ``root`` or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _state_dict_for_safetensors(sd: dict) -> dict:
    """Contiguous, unshared CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, truncated or corrupt; the message names the file."""


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _os_error(e: BaseException, name: str) -> OSError | None:
    """The I/O failure behind ``e``, if any: torch.save may re-raise a failed write as RuntimeError (the OSError
    is in its context), safetensors (Rust) reports ENOSPC as text, '... (os error 28)'."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        found = re.search(r"\(os error (\d+)\)", str(seen))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code), name)
        seen = seen.__cause__ or seen.__context__
    return None


def _write_files(tmp: str, model_sd: dict, ema_sd: dict, train_state: dict, config: dict) -> None:
    """The four files, each fsynced (a rename is only as durable as the data under it), mode 0666 & ~umask."""
    writers = [
        ("model.safetensors", lambda p: save_file(_state_dict_for_safetensors(model_sd), p)),
        ("ema.safetensors", lambda p: save_file(_state_dict_for_safetensors(ema_sd), p)),
        ("train_state.pt", lambda p: _write_with(p, lambda f: torch.save(train_state, f))),
        ("config.json", lambda p: _write_with(p, lambda f: f.write(json.dumps(config, indent=2, sort_keys=True)
                                                                   .encode()))),
    ]
    mode = 0o666 & ~_umask()  # safetensors and torch write 0600/0644 regardless; the project rule is the umask
    for name, write in writers:
        path = os.path.join(tmp, name)
        try:
            write(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            err = _os_error(e, name)
            if err is None:
                raise
            raise OSError(err.errno, f"{name}: {err.strerror or err}") from e
        os.chmod(path, mode)


def _write_with(path: str, write) -> None:
    """``write(file)`` into an open Python file: torch.save to a path loses the errno (ENOSPC becomes a bare
    RuntimeError), a Python file object raises the OSError itself."""
    with open(path, "wb") as f:
        write(f)


def save_checkpoint(root: str, step: int, *, model_sd: dict, ema_sd: dict, train_state: dict,
                    config: dict, keep_last: int | None = None) -> str:
    """Write one checkpoint atomically and prune to the newest ``keep_last`` (None/0: keep all); returns its path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{step:07d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_files(tmp, model_sd, ema_sd, train_state, config)
        if os.path.exists(final):  # re-saving a step (e.g. resumed run ends where it started)
            old = f"{final}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # disk full, quota, I/O error: say what survived
            prev = latest_checkpoint(root)
            raise OSError(e.errno, f"writing checkpoint {final} failed ({e.strerror or e}); nothing was published "
                          f"(its temporary directory is removed) and the previous checkpoint "
                          f"{prev + ' is intact' if prev else '(none yet) is not affected'}. Free space and rerun "
                          f"the same command (it resumes from the newest checkpoint)") from e
        raise
    for name in os.listdir(root):  # leftovers of killed runs: never read (temp dirs are not checkpoints)
        if re.fullmatch(r"\d{7}\.(tmp|old)-\d+", name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint directory: ``{"model", "ema", "train_state", "config"}``.

    Raises CheckpointError naming the missing, truncated or corrupt file (``--resume auto`` then falls back to
    the previous checkpoint), and ValueError for a train_state.pt that would need unpickling code (never
    fallen back from: it is not damage, it is someone else's file).
    """
    need = ["model.safetensors", "ema.safetensors", "train_state.pt", "config.json"]
    for name in need:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(
                f"checkpoint {path!r} has no {name}; pass a directory written by repa-train "
                f"(<output-dir>/<exp-name>/checkpoints/<step>) or --resume auto")
    out = {}
    for key, name, read in (("config", "config.json", _read_json),
                            ("train_state", "train_state.pt", lambda p: _read_state(p, map_location)),
                            ("model", "model.safetensors", load_file), ("ema", "ema.safetensors", load_file)):
        try:
            out[key] = read(os.path.join(path, name))
        except ValueError as e:
            if "refused to unpickle" in str(e):
                raise
            raise CheckpointError(f"{name} is corrupt ({type(e).__name__}: {e})") from None
        except Exception as e:  # noqa: BLE001 - safetensors/torch report truncation with their own types
            raise CheckpointError(f"{name} is truncated or corrupt ({type(e).__name__}: {e})") from None
    return out


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _read_state(state_path: str, map_location) -> dict:
    try:
        return torch.load(state_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise RuntimeError(str(e)) from None  # truncated or damaged, not a refused object
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{state_path}: refused to unpickle: it holds objects{f' ({found.group(1)})' if found else ''} "
                         f"other than tensors and plain containers, which repa-train never writes and which could "
                         f"run arbitrary code; resume only from checkpoints written by repa-train") from None


# ---------------------------------------------------------------- RNG states (weights_only-safe)

def rng_state() -> dict:
    """This process's RNG states as tensors/lists/ints (no numpy objects: weights_only loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(x):
    """Tuples -> lists recursively (python RNG state is nested tuples of ints)."""
    if isinstance(x, tuple):
        return [_to_lists(v) for v in x]
    return x


# ---------------------------------------------------------------- saving from a running job

class Checkpointer:
    """Saves a running job: every rank's RNG and reader position are gathered to rank 0, which writes the
    checkpoint atomically; remembers the last one written (``last``, ``saved_at``)."""

    def __init__(self, accelerator, root: str, raw_model, ema, optimizer, position, run_config: dict,
                 keep_last: int, last: str | None, saved_at: int | None):
        self.accelerator, self.root, self.raw_model, self.ema, self.optimizer = accelerator, root, raw_model, ema, optimizer
        self.position = position  # () -> this rank's reader state_dict
        self.run_config, self.keep_last, self.last, self.saved_at = run_config, keep_last, last, saved_at

    def snapshot(self) -> dict:
        """This rank's RNG and reader position now (to save the state before a step that turns out void)."""
        return {"rng": rng_state(), "loader": self.position()}

    def save(self, step: int, per_rank: dict | None = None) -> str:
        from accelerate.utils import gather_object
        acc = self.accelerator
        ranks = gather_object([per_rank or self.snapshot()])
        path = os.path.join(self.root, f"{step:07d}")
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else {}
            train_state = {"step": step, "optimizer": self.optimizer.state_dict(), "scaler": scaler,
                           "world_size": acc.num_processes, "ranks": ranks}
            path = save_checkpoint(self.root, step, model_sd=self.raw_model.state_dict(), ema_sd=self.ema.state_dict(),
                                   train_state=train_state, config={**self.run_config, "step": step},
                                   keep_last=self.keep_last or None)
        acc.wait_for_everyone()
        self.last, self.saved_at = path, step
        return path
