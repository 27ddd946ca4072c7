"""`repa-preprocess`: run the frozen SD-VAE and teachers over a dataset once and write shards.

    repa-preprocess imagenet --data-dir /data/ILSVRC2012/train --res 256
    repa-preprocess digits --res 32 --vae none --enc-type none
    torchrun --nproc_per_node 8 -m repa.preprocess.cli imagenet --res 512 --out s3://bucket/in512

Rerunning the same command resumes a killed run. See README.md (repa-preprocess).
"""
from __future__ import annotations

import json
import sys

import click

from .pipeline import Options, PreprocessError, run

_SOURCES_HELP = ("SOURCE: imagenet (--data-dir train folder, else the HF stream ILSVRC/imagenet-1k), cifar10, "
                 "cifar100, digits (offline, bundled with scikit-learn), imagefolder:PATH, hf:NAME")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@click.command(help=f"Precompute VAE latents and teacher features into shards.\n\n{_SOURCES_HELP}",
               context_settings={"show_default": True, "max_content_width": 110,
                                 "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repa", prog_name="repa-preprocess")
@click.argument("source")
@click.option("--res", type=int, default=256, help="ADM center-crop side (multiple of 16).")
@click.option("--out", default=None, help="Output directory or object-store URL [default: shards/<source>-<res>].")
@click.option("--data-dir", default=None, help="imagenet: local ILSVRC-2012 train folder (nXXXXXXXX/*.JPEG).")
@click.option("--split", default="train", help="HF sources: split.")
@click.option("--image-column", default=None, help="HF sources: image column [default: image or img].")
@click.option("--label-column", default=None, help="HF sources: label column [default: label or fine_label].")
@click.option("--streaming/--no-streaming", default=None,
              help="HF sources: stream instead of downloading [default: stream for imagenet only].")
@click.option("--num-classes", type=int, default=None, help="Override the number of classes.")
@click.option("--vae", default="ema", help="ema | mse | none | HF repo id | local diffusers directory.")
@click.option("--enc-type", default="dinov2-vit-b",
              help="Comma list of teachers (dinov2-vit-b, clip-vit-L, timm:NAME, ...) or none.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="Teacher autocast; auto = fp16 on CUDA (the reference), fp32 on CPU.")
@click.option("--vae-precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
              help="VAE autocast (the reference encodes in fp32).")
@click.option("--feature-codec", type=click.Choice(["bf16", "fp16", "fp32", "int8"]), default="bf16",
              help="Storage codec of teacher features.")
@click.option("--flip", is_flag=True, help="Also store moments_flip / feat_flip.<i> of the mirrored image.")
@click.option("--haste", is_flag=True, help="Also store haste.0: teacher 0's residual stream entering block 8.")
@click.option("--shard-size", type=int, default=1000, help="Records per shard.")
@click.option("--seed", type=int, default=0, help="Seed of the write-order permutation.")
@click.option("--limit", type=int, default=None, help="Only the first N images (trials).")
@click.option("--no-exif-transpose", is_flag=True, help="Ignore EXIF orientation (the reference ignores it).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (reported, counted in the manifest).")
@click.option("--batch-size", type=int, default=64, help="Images per model forward (per process).")
@click.option("--num-workers", type=int, default=None, help="Decode workers per process [default: min(8, cpus)].")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the VAE encoder and teachers.")
@click.option("--device", default=None, help="Device [default: cuda:<local rank> if available, else cpu].")
@click.option("--storage-options", default=None, help="JSON dict for fsspec (object stores), e.g. "
              "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--verify/--no-verify", default=True,
              help="On a rerun, read every finished shard once (sha256 + each record's CRC) and rewrite those "
                   "that fail.")
@click.option("--requeue-signal", default="USR1",
              help="Signal that, like SIGTERM/SIGINT, stops the run cleanly (exit 0, rerun to resume); none to "
                   "disable (SLURM: --signal=B:USR1@120).")
def main(source, res, out, data_dir, split, image_column, label_column, streaming, num_classes, vae, enc_type,
         precision, vae_precision, feature_codec, flip, haste, shard_size, seed, limit, no_exif_transpose,
         skip_bad, batch_size, num_workers, compile_, device, storage_options, no_progress, verify,
         requeue_signal):
    try:
        so = json.loads(storage_options) if storage_options else None
    except ValueError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint="--storage-options") from e
    opts = Options(source=source, res=res, out=out, data_dir=data_dir, split=split, image_column=image_column,
                   label_column=label_column, streaming=streaming, num_classes=num_classes, vae=vae,
                   enc_type=enc_type, precision=precision, vae_precision=vae_precision,
                   feature_codec=feature_codec, flip=flip, haste=haste, shard_size=shard_size, seed=seed,
                   limit=limit, exif_transpose=not no_exif_transpose, skip_bad=skip_bad, batch_size=batch_size,
                   num_workers=num_workers, compile=compile_, device=device, storage_options=so,
                   progress=not no_progress, verify=verify, requeue_signal=requeue_signal)
    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731
    try:
        s = run(opts, echo=echo)
    except (PreprocessError, ValueError, OSError) as e:
        from .sources import SourceError  # noqa: F401  (SourceError is a RuntimeError subclass)
        raise click.ClickException(str(e)) from e
    except RuntimeError as e:
        if type(e).__name__ in ("SourceError", "ModelDownloadError", "ManifestError"):
            raise click.ClickException(str(e)) from e
        raise
    if s.get("stopped"):
        click.echo(f"stopped by {s['stopped']}: {s['out']}: {s['shards_written']} shards written by this run; "
                   "rerun the same command to finish")
    elif "records" in s:
        click.echo(
            f"done: {s['out']}: {s['records']} records in {s['shards']} shards, {_human(s['bytes'])} "
            f"({_human(s['bytes_per_record'])}/record), {s['seconds']:.1f} s "
            f"({s['records_written']} records written by this run at {s['images_per_s']:.1f} images/s), "
            f"skipped files: {s['skipped']}")
    return s


if __name__ == "__main__":  # python -m repa.preprocess.cli (torchrun -m repa.preprocess.cli)
    sys.exit(main())
