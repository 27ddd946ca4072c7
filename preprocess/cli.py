"""`repa-preprocess`: run the frozen SD-VAE and teachers over a dataset once and write shards.

    repa-preprocess imagenet --data-dir /data/ILSVRC2012/train --res 256
    repa-preprocess digits --res 32 --vae none --enc-type none
    torchrun --nproc_per_node 8 -m repa.preprocess.cli imagenet --res 512 --out s3://bucket/in512

Rerunning the same command resumes a killed run. See docs/preprocess.md. The flags are generated from
the fields of `plan.Options` (their help, types and defaults are written there once).
"""
from __future__ import annotations

import dataclasses
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


def _flag(f: dataclasses.Field):
    """The click option of one Options field (see plan.flag): name, type, default and help from the field."""
    md, name = f.metadata, "--" + f.name.replace("_", "-")
    kind = md.get("type", type(f.default))
    if kind is bool:  # True by default or tri-state: a --x/--no-x pair; False by default: a plain flag
        if f.default is False:
            return click.option(name, f.name, is_flag=True, default=False, help=md["help"])
        return click.option(f"{name}/--no-{name[2:]}", f.name, default=f.default, help=md["help"])
    if "choices" in md:
        kind = click.Choice(list(md["choices"]))
    elif kind in (dict, type(None)):
        kind = str  # dict: JSON text, parsed in main(); None default: a string unless the field says otherwise
    return click.option(name, f.name, type=kind, default=f.default, help=md["help"])


def _options(cmd):
    for f in reversed(dataclasses.fields(Options)):
        if "help" in f.metadata:
            cmd = _flag(f)(cmd)
    return cmd


@click.command(help=f"Precompute VAE latents and teacher features into shards.\n\n{_SOURCES_HELP}",
               context_settings={"show_default": True, "max_content_width": 110,
                                 "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repa", prog_name="repa-preprocess")
@click.argument("source")
@_options
def main(source, **flags):
    try:
        so = flags["storage_options"]
        flags["storage_options"] = json.loads(so) if so else None
    except ValueError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint="--storage-options") from e
    opts = Options(source=source, **flags)
    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731
    try:
        s = run(opts, echo=echo)
    except (PreprocessError, ValueError, OSError) as e:
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
