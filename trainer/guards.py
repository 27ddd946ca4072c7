"""Everything repa-train refuses before step 1: flag ranges, the experiment name, model keywords, an empty shard
set, a preview VAE folder that has moved, an unwritable output or checkpoint folder.

Each check raises :class:`ConfigError` naming the flag (or folder), the value and what is allowed; the CLI
turns it into exit code 2 (a usage error: rerunning the same command cannot help)."""
from __future__ import annotations

import inspect
import math
import os
import tempfile

from repa.trainer.models import SiT


class ConfigError(ValueError):
    """A flag or input that cannot work; found before any training work (CLI exit code 2)."""


def show(value) -> str:
    """A flag value as the user would type it: 2.0 -> '2', 1e-4 -> '0.0001', True -> 'True'."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(lo):
    return (lambda v: v >= lo), f">= {lo}"


def _positive():
    return (lambda v: v > 0), "> 0"


def _unit(closed: bool):
    if closed:
        return (lambda v: 0 <= v <= 1), "in [0, 1]"
    return (lambda v: 0 <= v < 1), "in [0, 1)"


# field -> (predicate, allowed range as text); every numeric flag of TrainConfig is listed
RANGES = {
    "batch_size": _at_least(1), "gradient_accumulation_steps": _at_least(1), "max_train_steps": _at_least(1),
    "checkpointing_steps": _at_least(1), "num_workers": _at_least(0), "shuffle_window": _at_least(1),
    "keep_last": ((lambda v: v >= 0), ">= 0 (0 keeps all checkpoints)"),
    "sampling_steps": ((lambda v: v >= 0), ">= 0 (0: no preview grids)"), "num_preview": _at_least(1),
    "preview_steps": _at_least(1), "preview_cfg": _at_least(1.0), "encoder_depth": _at_least(1),
    "ema_decay": _unit(closed=True), "cfg_prob": _unit(closed=False), "adam_beta1": _unit(closed=False),
    "adam_beta2": _unit(closed=False), "proj_coeff": _at_least(0), "attn_coeff": _at_least(0),
    "adam_weight_decay": _at_least(0), "learning_rate": _positive(), "adam_epsilon": _positive(),
    "max_grad_norm": _positive(), "early_stop_point": _at_least(0),
}


def validate_flags(cfg) -> None:
    """Ranges of every numeric flag, the experiment name and the --model-kwargs keys (no I/O)."""
    for name, (ok, allowed) in RANGES.items():
        v = getattr(cfg, name)
        if isinstance(v, float) and not math.isfinite(v) or not ok(v):
            raise ConfigError(f"{_flag(name)} {show(v)}: must be {allowed}")
    check_exp_name(cfg.exp_name)
    if not str(cfg.model).startswith("MMDiT-"):  # MMDiT keys are checked by trainer/mmdit.mmdit_config
        check_model_kwargs(cfg.model_kwargs)


def check_exp_name(name: str) -> None:
    """The run folder is <output-dir>/<exp-name>: a name that climbs out of it or nests is refused."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or name != name.strip()):
        raise ConfigError(f"--exp-name {name}: must be a plain folder name (no '/', '\\', '..', not absolute); "
                          f"the run is written to <output-dir>/<exp-name>, put any path into --output-dir")


def check_model_kwargs(kwargs: dict) -> None:
    known = [p for p in inspect.signature(SiT.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"--model-kwargs: unknown key(s) {', '.join(map(repr, unknown))}; SiT accepts "
                          f"{', '.join(known)}")


def check_records(manifest, shards_url: str) -> None:
    if manifest.num_records == 0:
        raise ConfigError(f"--shards {shards_url}: the shard set is empty (0 records in manifest.json); "
                          f"re-run repa-preprocess on a non-empty dataset")


def check_preview_vae(cfg, provenance: dict) -> str | None:
    """The VAE the preview grids decode with: --preview-vae, else the shards' vae.id. A local folder that is gone
    is refused now rather than discovered at the first preview (and blamed on a --vae flag of another tool)."""
    vae_id = cfg.preview_vae or (provenance.get("vae") or {}).get("id")
    if not cfg.sampling_steps or not vae_id:
        return vae_id
    path = os.path.expanduser(vae_id)
    local = os.path.isabs(path) or vae_id.startswith((".", "~"))
    if cfg.preview_vae and local and not os.path.isdir(path):
        raise ConfigError(f"--preview-vae {cfg.preview_vae}: no such folder; pass the diffusers AutoencoderKL "
                          f"folder the shards were encoded with, or --sampling-steps 0 to train without previews")
    if local and not os.path.isdir(path):
        raise ConfigError(f"the shard set's VAE folder {vae_id} (manifest.json provenance vae.id) no longer exists; "
                          f"it is only needed to decode the preview grids: pass --preview-vae <its new location>, "
                          f"or --sampling-steps 0 to train without previews")
    return vae_id


def check_writable(folder: str, what: str) -> None:
    """Create ``folder`` if needed and write + remove a probe file in it; refuse naming it if that fails."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".repa-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{what} {folder} is not writable ({e.strerror or e}); fix its permissions or mount, "
                          f"or pass another --output-dir") from None


def official_flags(manifest, *, enc_type=None, resolution=None, num_classes=None, legacy=False) -> None:
    """The official ``train.py`` flags that the shard set already decides (docs/reference.md §9.1): accepted so
    an official command can be pasted, and checked against the manifest instead of being ignored."""
    if legacy:
        raise ConfigError("--legacy (the official double label dropout, effective rate 0.19) is not supported: "
                          "--cfg-prob is applied once, inside the model; drop --legacy (docs/reference.md §2.6)")
    prov = manifest.provenance
    if enc_type is not None:
        have = [t.get("name") for t in prov.get("teachers") or []]
        want = [e.strip() for e in enc_type.split(",") if e.strip()]
        if want != have:
            raise ConfigError(f"--enc-type {enc_type}: the shard set was preprocessed with teachers {have}; the "
                              "features are cached, so preprocess again with --enc-type to change them")
    for flag, value, key in (("--resolution", resolution, "resolution"), ("--num-classes", num_classes,
                                                                          "num_classes")):
        if value is not None and int(value) != int(prov.get(key, -1)):
            raise ConfigError(f"{flag} {value}: the shard set has {key} {prov.get(key)}; this comes from the "
                              "shards (repa-preprocess), drop the flag or point --shards at another set")


def epochs_to_steps(max_train_steps: int, epochs: int | None, num_records: int, batch_size: int) -> int:
    """The official loop stops at ``--epochs`` or ``--max-train-steps``, whichever comes first."""
    if epochs is None:
        return max_train_steps
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: must be >= 1")
    return max(1, min(max_train_steps, epochs * (num_records // batch_size)))
