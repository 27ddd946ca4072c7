"""``repa-train``: the command line of trainer/train.py (reference flag names, docs/reference.md §9.1).

Single process:   repa-train --shards shards/ --model SiT-B/2 --encoder-depth 4 --exp-name b2
Multi-GPU:        accelerate launch --multi_gpu --num_processes 8 -m repa.trainer.cli --shards ... (or the
                  console script: accelerate launch --num_processes 8 $(which repa-train) ...)
On CPU, for tests: torchrun --standalone --nproc_per_node 2 -m repa.trainer.cli ...
"""
from __future__ import annotations

import json
import os
import sys

import click

from repa.shards.lock import LockHeld
from repa.shards import read_manifest
from repa.trainer.guards import ConfigError, epochs_to_steps, official_flags
from repa.trainer.train import BadRecordError, NonFiniteLossError, TrainConfig, _version, resolve_shards, train

D = TrainConfig()  # defaults live in one place


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(_version(), "--version", prog_name="repa-train")
@click.option("--shards", "--data-dir", "shards", required=True, help="Shard set from repa-preprocess: directory "
              "or URL (s3://, ...); a directory holding exactly one shard set is accepted too.")
@click.option("--storage-options", callback=_json_dict, default=None, help="fsspec options as JSON (object stores).")
@click.option("--output-dir", default=D.output_dir)
@click.option("--exp-name", required=True)
@click.option("--model", default=D.model, help="SiT-{S,B,L,XL}/{1,2,4,8}; captioned (text.*) shards: "
              "MMDiT-{S,B,L,XL}/2 (MMDiT-B/2 = the official t2i recipe, docs/t2i.md).")
@click.option("--model-kwargs", callback=_json_dict, default=None,
              help="JSON overrides of SiT(...) kwargs, e.g. '{\"depth\": 2, \"hidden_size\": 64, \"num_heads\": 2}'.")
@click.option("--encoder-depth", type=int, default=D.encoder_depth, help="1-indexed block whose output is projected.")
@click.option("--fused-attn/--no-fused-attn", default=D.fused_attn)
@click.option("--qk-norm/--no-qk-norm", default=D.qk_norm)
@click.option("--proj-coeff", type=float, default=D.proj_coeff)
@click.option("--path-type", type=click.Choice(["linear", "cosine"]), default=D.path_type)
@click.option("--prediction", type=click.Choice(["v"]), default=D.prediction)
@click.option("--weighting", type=click.Choice(["uniform", "lognormal"]), default=D.weighting)
@click.option("--cfg-prob", type=float, default=D.cfg_prob,
              help="Label dropout probability = the model's class_dropout_prob (applied once, inside the model).")
@click.option("--batch-size", type=int, default=D.batch_size, help="GLOBAL batch over all processes and "
              "accumulation steps.")
@click.option("--learning-rate", type=float, default=D.learning_rate)
@click.option("--adam-beta1", type=float, default=D.adam_beta1)
@click.option("--adam-beta2", type=float, default=D.adam_beta2)
@click.option("--adam-weight-decay", type=float, default=D.adam_weight_decay)
@click.option("--adam-epsilon", type=float, default=D.adam_epsilon)
@click.option("--max-grad-norm", type=float, default=D.max_grad_norm)
@click.option("--gradient-accumulation-steps", type=int, default=D.gradient_accumulation_steps)
@click.option("--max-train-steps", type=int, default=D.max_train_steps)
@click.option("--ema-decay", type=float, default=D.ema_decay)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=D.mixed_precision)
@click.option("--allow-tf32", is_flag=True, default=D.allow_tf32)
@click.option("--compile", "compile_", is_flag=True, default=D.compile, help="torch.compile the SiT.")
@click.option("--grad-checkpointing", is_flag=True, default=D.grad_checkpointing,
              help="Activation checkpointing of every SiT block (less memory, ~30%% more compute).")
@click.option("--seed", type=int, default=D.seed, help="Rank r uses seed + r.")
@click.option("--num-workers", type=int, default=D.num_workers, help="DataLoader workers per process.")
@click.option("--shuffle-window", type=int, default=D.shuffle_window)
@click.option("--checkpointing-steps", type=int, default=D.checkpointing_steps)
@click.option("--keep-last", type=int, default=D.keep_last, help="Keep only the newest K checkpoints (0: all; "
              "nothing else is ever deleted).")
@click.option("--resume", default=D.resume, help="'auto': continue from the newest intact checkpoint of this "
              "experiment (a fresh start if it has none), so rerunning the same command (a SLURM requeue) "
              "continues; or a checkpoint directory.")
@click.option("--resume-step", type=int, default=None, help="Resume from checkpoints/<step> of this experiment "
              "(shorthand for --resume <output-dir>/<exp-name>/checkpoints/<step:07d>).")
@click.option("--skip-bad", is_flag=True, default=D.skip_bad, help="Skip corrupt records (counted in metrics.jsonl "
              "as skipped_records and in the log) instead of stopping with a checkpoint.")
@click.option("--requeue-signal", default=D.requeue_signal, help="Signal that means 'checkpoint, then exit 0' "
              "(besides SIGTERM/SIGINT), e.g. for sbatch --signal=USR1@120; 'none' to disable.")
@click.option("--report-to", type=click.Choice(["none", "tensorboard", "wandb"]), default=D.report_to,
              help="Tracker; <output-dir>/<exp-name>/metrics.jsonl is written in any case.")
@click.option("--sampling-steps", type=int, default=D.sampling_steps, help="EMA preview grid every N steps (0: off).")
@click.option("--num-preview", type=int, default=D.num_preview)
@click.option("--preview-steps", type=int, default=D.preview_steps, help="Euler steps of the preview sampler.")
@click.option("--preview-cfg", type=float, default=D.preview_cfg)
@click.option("--preview-vae", default=None, help="VAE folder for decoding previews when the shards' VAE folder "
              "(manifest vae.id) has moved.")
@click.option("--progress/--no-progress", default=D.progress, help="tqdm progress bar.")
@click.option("--haste/--no-haste", default=None, help="HASTE attention alignment (default: on iff the shards "
              "were written with repa-preprocess --haste).")
@click.option("--attn-coeff", type=float, default=D.attn_coeff)
@click.option("--enc-type", default=None, help="Official flag, checked: the teachers are those the shards were "
              "preprocessed with (repa-preprocess --enc-type).")
@click.option("--resolution", type=int, default=None, help="Official flag, checked against the shard set.")
@click.option("--num-classes", type=int, default=None, help="Official flag, checked against the shard set.")
@click.option("--epochs", type=int, default=None, help="Official flag: stop after this many epochs of the shard "
              "set or at --max-train-steps, whichever comes first.")
@click.option("--legacy/--no-legacy", default=False, help="Official flag: the double label dropout; refused "
              "(--cfg-prob is applied once).")
@click.option("--early-stop-point", type=int, default=D.early_stop_point,
              help="HASTE: first step without any alignment (no teacher data is read from then on).")
def main(**kwargs):
    """Train SiT with REPA (or HASTE) on a cached shard set.

    Exit codes: 0 done, or stopped by SIGTERM/SIGINT/--requeue-signal after writing a checkpoint (rerun the same
    command to continue); 1 the run failed (non-finite loss, corrupt record, disk full, experiment locked by
    another run); 2 a flag or input was refused before any work.
    """
    kwargs["compile"] = kwargs.pop("compile_")
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
