"""``repa-eval SAMPLES.npz --ref REF.npz``: FID, sFID, Inception Score, precision and recall (ADM protocol).

Both files are ADM-style ``.npz``: ``arr_0`` = uint8 (N, H, W, 3). The reference batch (e.g. ADM's
``VIRTUAL_imagenet256_labeled.npz``) may carry precomputed ``mu``/``sigma`` (pool3) and ``mu_s``/``sigma_s``
(spatial) statistics, which are used as they are (ADM does the same); its images are still needed for
precision/recall (skipped, with a note, when the file has no images). Features come from the PyTorch port of the
TF FID Inception (``sampler/inception.py``). Prints the result JSON and writes it (atomically) next to SAMPLES
(``<samples>.eval.json``) or to ``--output``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import click
import numpy as np
import torch

from .align import cli as align_cli
from .inception import InceptionWeightsError, load_fid_inception
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from .npz import atomic_write_bytes, load_images_npz

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class _EvalCommand(click.Command):
    """``repa-eval align ...`` goes to the alignment evaluation (``repa.sampler.align``); anything else is
    ``repa-eval SAMPLES.npz --ref REF.npz``."""

    def main(self, args=None, prog_name=None, **kwargs):
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] == ["align"]:
            return align_cli(argv)  # takes the argv with its leading "align"
        return super().main(args=argv, prog_name=prog_name, **kwargs)


@click.command(cls=_EvalCommand, context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                 "max_content_width": 110},
               help=__doc__.split("\n\n")[0].replace("``", "") + "\n\nrepa-eval align CKPT SET ...: "
               "representation alignment of a checkpoint (see repa-eval align --help).")
@click.argument("samples")
@click.option("--ref", required=True, help="reference batch .npz (arr_0 images and/or mu/sigma/mu_s/sigma_s)")
@click.option("--inception-weights", default=None,
              help="path to pt_inception-2015-12-05-6726825d.pth (default: cache, else download)")
@click.option("--batch-size", type=click.IntRange(min=1), default=100)
@click.option("--device", default=None, help="default: cuda if available, else cpu")
@click.option("--output", default=None, help="result JSON path (default: <samples>.eval.json)")
@click.option("--no-pr", is_flag=True, default=False,
              help="skip precision/recall (no reference activations needed)")
@click.option("--no-progress", is_flag=True, default=False, help="no progress bars")
@click.version_option(package_name="repa", prog_name="repa-eval")
def cli(**kwargs):
    """Console entry point (the process exits 0 after a successful run)."""
    args = SimpleNamespace(**kwargs)
    result = evaluate(args)
    out = args.output or (args.samples[:-4] if args.samples.endswith(".npz") else args.samples) + ".eval.json"
    text = json.dumps(result, indent=2, sort_keys=True)
    atomic_write_bytes(out, text.encode())
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(text, flush=True)
    return result


@torch.no_grad()
def compute_activations(model, images: np.ndarray, batch_size: int, device, desc: str, progress: bool) -> dict:
    """pool3 (N, 2048), spatial (N, 2023) and logits (N, 1008) as float64 numpy arrays."""
    out = {"pool3": [], "spatial": [], "logits": []}
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", total=(len(images) + batch_size - 1) // batch_size)
    for i in starts:
        batch = torch.from_numpy(np.array(images[i:i + batch_size])).to(device)  # copy: the npz may be a read-only mmap
        feats = model(batch)
        for k in out:
            out[k].append(feats[k].double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _load_ref(path: str) -> tuple[dict, bool]:
    """Precomputed statistics of the reference batch (those present) and whether it holds images."""
    if not os.path.isfile(path):
        raise SystemExit(f"repa-eval: --ref {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            stats = {k: np.asarray(z[k], np.float64) for k in STAT_KEYS if k in files}
    except (ValueError, OSError) as e:
        raise SystemExit(f"repa-eval: --ref {path}: not a readable .npz ({e})") from None
    return stats, "arr_0" in files


def evaluate(args) -> dict:
    progress = not args.no_progress
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = load_fid_inception(args.inception_weights, device)
    except InceptionWeightsError as e:
        raise SystemExit(f"repa-eval: {e}") from None
    try:
        samples = load_images_npz(args.samples)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"repa-eval: {e}") from None
    ref_stats, ref_has_images = _load_ref(args.ref)
    notes = []
    need_ref_acts = (not args.no_pr) or not all(k in ref_stats for k in STAT_KEYS)
    if need_ref_acts and not ref_has_images:
        if not all(k in ref_stats for k in STAT_KEYS):
            raise SystemExit(f"repa-eval: --ref {args.ref}: has neither images (arr_0) nor all of {STAT_KEYS}")
        notes.append("reference has no images: precision/recall skipped")
        need_ref_acts = False
    t0 = time.perf_counter()
    ref_acts = None
    if need_ref_acts:
        ref_acts = compute_activations(model, load_images_npz(args.ref), args.batch_size, device,
                                       "reference features", progress)
    acts = compute_activations(model, samples, args.batch_size, device, "sample features", progress)
    result: dict = {"samples": os.path.abspath(args.samples), "ref": os.path.abspath(args.ref),
                    "num_samples": int(len(samples)), "image_shape": list(samples.shape[1:])}
    result["inception_score"] = inception_score(acts["logits"])
    for name, layer, mk, sk in (("fid", "pool3", "mu", "sigma"), ("sfid", "spatial", "mu_s", "sigma_s")):
        if mk in ref_stats and sk in ref_stats:
            mu_r, sigma_r = ref_stats[mk], ref_stats[sk]
            src = "precomputed in --ref"
        else:
            mu_r, sigma_r = feature_statistics(ref_acts[layer])
            src = "computed from --ref images"
        mu_s, sigma_s = feature_statistics(acts[layer])
        try:
            value, info = frechet_distance(mu_r, sigma_r, mu_s, sigma_s, features2=acts[layer])
        except ValueError as e:
            raise SystemExit(f"repa-eval: {name}: {e}") from None
        info["reference_statistics"] = src
        result[name] = value
        result[f"{name}_sqrtm"] = info
        notes += [f"{name}: {n}" for n in info["notes"]]
    if ref_acts is not None and not args.no_pr:
        try:
            result["precision"], result["recall"] = precision_recall(ref_acts["pool3"], acts["pool3"], k=3)
        except ValueError as e:
            notes.append(f"precision/recall skipped: {e}")
    result["protocol"] = ("ADM evaluator: TF-Inception (2015-12-05) pool3 FID, mixed_6/conv[:7] sFID, bias-free "
                          "softmax IS (splits of 5000), k=3 precision/recall; PyTorch port (sampler/inception.py)")
    result["notes"] = notes
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv=None) -> dict:
    """Python entry point: ``main([SAMPLES, "--ref", REF, ...])`` -> the metrics dict (also printed and written).

    Bad flags raise SystemExit with the message."""
    try:
        return cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="repa-eval",
                        standalone_mode=False)
    except click.ClickException as e:
        raise SystemExit(f"repa-eval: {e.format_message()}") from None


if __name__ == "__main__":
    cli(prog_name="repa-eval")
