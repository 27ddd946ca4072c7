"""``repa-train``: the command line of trainer/train.py (reference flag names, docs/reference.md §9.1).

Single process:   repa-train --shards shards/ --model SiT-B/2 --encoder-depth 4 --exp-name b2
Multi-GPU:        accelerate launch --multi_gpu --num_processes 8 -m repa.trainer.cli --shards ... (or the
                  console script: accelerate launch --num_processes 8 $(which repa-train) ...)
On CPU, for tests: torchrun --standalone --nproc_per_node 2 -m repa.trainer.cli ...

The flags are generated from the fields of ``train.TrainConfig`` (their help, types and defaults are written
there once); the official-only flags below are checked against the shard set, not stored.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from repa.shards.lock import LockHeld
from repa.shards import read_manifest
from repa.trainer.guards import ConfigError, epochs_to_steps, official_flags
from repa.trainer.train import BadRecordError, NonFiniteLossError, TrainConfig, _version, resolve_shards, train

def _json_dict(ctx, param, value):
    if value is None:
        return {}
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e}); e.g. '{{\"depth\": 2, \"hidden_size\": 64}}'") from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object")
    return out


def _flag(f: dataclasses.Field):
    """The click option of one TrainConfig field (see train.flag): name, type, default and help from the field."""
    md, name = f.metadata, "--" + f.name.replace("_", "-")
    names, kw = [name, *md.get("aliases", [])], {"help": md["help"] or None}
    if md.get("required"):
        kw["required"] = True
    elif not md.get("json"):
        kw["default"] = f.default
    if f.type in ("bool", "bool | None"):
        if f.default is False and not md.get("pair"):
            return click.option(*names, f.name, is_flag=True, **kw)
        return click.option(f"{name}/--no-{name[2:]}", f.name, **kw)
    if md.get("json"):
        return click.option(*names, f.name, callback=_json_dict, default=None, **kw)
    kind = click.Choice(md["choices"]) if "choices" in md else {"int": int, "float": float}.get(f.type, str)
    return click.option(*names, f.name, type=kind, **kw)


def _options(cmd):
    for f in reversed(dataclasses.fields(TrainConfig)):
        cmd = _flag(f)(cmd)
    return cmd


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(_version(), "--version", prog_name="repa-train")
@_options
@click.option("--resume-step", type=int, default=None, help="Resume from checkpoints/<step> of this experiment "
              "(shorthand for --resume <output-dir>/<exp-name>/checkpoints/<step:07d>).")
@click.option("--enc-type", default=None, help="Official flag, checked: the teachers are those the shards were "
              "preprocessed with (repa-preprocess --enc-type).")
@click.option("--resolution", type=int, default=None, help="Official flag, checked against the shard set.")
@click.option("--num-classes", type=int, default=None, help="Official flag, checked against the shard set.")
@click.option("--epochs", type=int, default=None, help="Official flag: stop after this many epochs of the shard "
              "set or at --max-train-steps, whichever comes first.")
@click.option("--legacy/--no-legacy", default=False, help="Official flag: the double label dropout; refused "
              "(--cfg-prob is applied once).")
def main(**kwargs):
    """Train SiT with REPA (or HASTE) on a cached shard set.

    Exit codes: 0 done, or stopped by SIGTERM/SIGINT/--requeue-signal after writing a checkpoint (rerun the same
    command to continue); 1 the run failed (non-finite loss, corrupt record, disk full, experiment locked by
    another run); 2 a flag or input was refused before any work.
    """
    step = kwargs.pop("resume_step")
    if step is not None:
        kwargs["resume"] = os.path.join(kwargs["output_dir"], kwargs["exp_name"], "checkpoints", f"{step:07d}")
    official = {k: kwargs.pop(k) for k in ("enc_type", "resolution", "num_classes", "legacy")}
    epochs = kwargs.pop("epochs")
    try:
        if any(v for v in official.values()) or epochs is not None:
            manifest = read_manifest(resolve_shards(kwargs["shards"], kwargs["storage_options"]),
                                     kwargs["storage_options"])
            official_flags(manifest, **official)
            kwargs["max_train_steps"] = epochs_to_steps(kwargs["max_train_steps"], epochs, manifest.num_records,
                                                        kwargs["batch_size"])
        train(TrainConfig(**kwargs))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except (NonFiniteLossError, BadRecordError, LockHeld) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        if e.errno is None:
            raise
        click.echo(f"Error: {e.strerror or e}", err=True)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
