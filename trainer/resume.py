"""What a resumed run continues from, and what it may change.

* Which checkpoint: ``--resume auto`` (the default, so rerunning the same command -- a SLURM requeue -- continues
  instead of restarting at step 0) takes the newest checkpoint that loads; a truncated or corrupt one is moved
  aside to ``<step>.corrupt-<time>`` (never deleted) with a warning naming it, and the previous one is used.
  ``--resume DIR`` takes exactly that one, and is refused when this experiment already has newer checkpoints
  (continuing would overwrite them).
* Which flags: every TrainConfig field is either APPLIED on resume (the new value is used and the change is
  logged and recorded in config.json's ``history``) or FIXED (a different value is refused, naming the flag and
  both values: the run would silently become another experiment). ``tests/test_train_flags.py`` checks that the
  two sets cover every field.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone

from repa.trainer import checkpoint as ckpt
from repa.trainer.guards import ConfigError, show

APPLIED_ON_RESUME = frozenset({
    "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
    "max_train_steps", "checkpointing_steps", "keep_last", "num_workers", "report_to", "sampling_steps",
    "num_preview", "preview_steps", "preview_cfg", "preview_vae", "allow_tf32", "compile", "grad_checkpointing",
    "skip_bad", "requeue_signal", "progress", "resume", "shards", "storage_options", "output_dir", "exp_name",
})
FIXED_ON_RESUME = frozenset({
    "model", "model_kwargs", "encoder_depth", "fused_attn", "qk_norm", "proj_coeff", "path_type", "prediction",
    "weighting", "cfg_prob", "batch_size", "gradient_accumulation_steps", "ema_decay", "mixed_precision", "seed",
    "shuffle_window", "haste", "attn_coeff", "early_stop_point",
})
NOT_LOGGED = {"resume", "output_dir", "exp_name"}  # where the run lives, not how it trains


def data_identity(manifest) -> dict:
    """The shard set's identity (record count + the sha256 of every shard), independent of its URL."""
    listing = json.dumps([[s.name, s.num_records, s.sha256] for s in manifest.shards])
    return {"num_records": manifest.num_records, "shards_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def step_of(path: str) -> int:
    return int(os.path.basename(os.path.normpath(path)))


def choose_checkpoint(resume: str | None, root: str, log) -> tuple[str | None, dict | None]:
    """(path, loaded checkpoint) to resume from, or (None, None) for a fresh start. See the module docstring."""
    if resume not in (None, "auto"):
        if not os.path.isdir(resume):
            raise ConfigError(f"--resume {resume}: no such checkpoint directory; pass "
                              f"<output-dir>/<exp-name>/checkpoints/<step> or --resume auto")
        try:
            loaded = ckpt.load_checkpoint(resume)
        except ckpt.CheckpointError as e:
            raise ConfigError(f"--resume {resume}: {e}") from None
        newer = [c for c in ckpt.list_checkpoints(root) if step_of(c) > int(loaded["train_state"]["step"])]
        if newer:
            raise ConfigError(f"--resume {resume}: this experiment already has newer checkpoints "
                              f"({', '.join(newer)}); continuing from an older one would overwrite them. Resume "
                              f"into a new --exp-name, or move the newer checkpoints away first")
        return resume, loaded
    for path in reversed(ckpt.list_checkpoints(root)):
        try:
            return path, ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as e:
            aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(path, aside)
            log.warning(f"checkpoint {path} is unreadable ({e}); moved it to {aside} (kept, not deleted) and "
                        f"trying the previous one")
    return None, None


def resume_changes(old: dict, cfg, identity: dict, path: str) -> dict:
    """{field: [old, new]} of the APPLIED flags that differ; raises ConfigError for a FIXED one that differs."""
    args = old.get("args", {})
    step = old.get("step")
    for name in sorted(FIXED_ON_RESUME & set(args)):
        new = getattr(cfg, name)
        if json.loads(json.dumps(new)) != args[name]:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"--resume {path}: {flag} changed from {show(args[name])} to {show(new)}; the run "
                              f"to step {step} was trained with {flag} {show(args[name])}, and this flag cannot "
                              f"change mid-run. Pass {flag} {show(args[name])} to resume, or start a new --exp-name")
    was = old.get("data_identity")
    if was and was != identity:
        raise ConfigError(f"--shards {cfg.shards}: a different shard set ({identity['num_records']} records, shards "
                          f"sha256 {identity['shards_sha256'][:12]}) than the one {path} was trained on "
                          f"({was['num_records']} records, {was['shards_sha256'][:12]}); resume with the same "
                          f"shards (moving them is fine) or start a new --exp-name")
    return {name: [args[name], json.loads(json.dumps(getattr(cfg, name)))]
            for name in sorted((APPLIED_ON_RESUME - NOT_LOGGED) & set(args))
            if json.loads(json.dumps(getattr(cfg, name))) != args[name]}


def history(old: dict | None, path: str | None, changes: dict) -> list:
    """config.json's ``history``: one entry per resume (step, checkpoint, time, changed flags)."""
    if old is None:
        return []
    entry = {"step": int(old["step"]), "resumed_from": path, "changed": changes,
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return [*old.get("history", []), entry]


def trim_metrics(path: str, step: int, log) -> None:
    """Drop metrics.jsonl records of steps after ``step`` (they are redone) and any line cut by a kill."""
    if not os.path.exists(path):
        return
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                ok = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
        os.replace(tmp, path)
        log.info(f"metrics.jsonl: dropped {dropped} record(s) after step {step} (the resumed run redoes them)")
