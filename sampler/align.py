"""``repa-eval align CKPT --shards DIR``: how well a SiT's hidden states align with the frozen teacher.

For a checkpoint (``repa.sampler.load``) and the shard set it was trained on (or any shard set with the same
latent shape and a ``feat.<i>`` field), at each noise level t:

1. ``N`` records are read in shard order; x0 is the posterior *mean* of the stored moments, scaled like the
   trainer does (``mean * scale + bias``; the mean, not a posterior draw, so that the probe is deterministic);
2. x_t = alpha_t x0 + sigma_t eps on the checkpoint's interpolant, eps seeded per record index;
3. the SiT runs on x_t with the *null class* (``--cond null``, the default: hidden states then say what the
   network reads from the image, not the label it was given) or the true label (``--cond label``);
4. every block's output (or ``--layers``) and the projector output are averaged over tokens -> (N, D).

Per layer it reports

* ``cknna``: CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis", k = 10) between the pooled
  hidden states and the token-averaged teacher features of the same records (see `cknna` below);
* ``linear_probe_acc``: accuracy of a logistic regression reading the class label from the pooled states,
  trained on a fixed seeded split (``--probe-train-frac``) and scored on the rest (scikit-learn; install it
  with ``pip install 'repa[demo]'`` or skip the probe with ``--no-probe``).

The projector row (``"name": "projector"``) is the CKNNA of the token-averaged projector output; a
``"teacher"`` row gives the linear probe of the teacher features themselves (the ceiling of the probe).
The result (one row per t and layer) is written atomically as JSON, with a PNG of alignment by layer.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys

import numpy as np
import torch

from repa.sampler.load import CheckpointError, load_sampling_model
from repa.sampler.npz import atomic_write_bytes
from repa.shards.reader import ShardStream
from repa.trainer.loss import interpolant

__all__ = ["cknna", "cknna_reference", "mutual_knn_mask", "pooled_states", "linear_probe", "align_probe",
           "read_probe_records", "cli"]


class AlignError(ValueError):
    """Bad input to the probe; the message names the file or flag and what to do."""


# ------------------------------------------------------------------ CKNNA

def _center(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n: the kernel of the mean-centred features."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _knn_mask(k: torch.Tensor, topk: int) -> torch.Tensor:
    """(n, n) bool: j is one of the ``topk`` most similar other samples of i under kernel k (i != j)."""
    n = k.shape[0]
    scores = k.clone()
    scores.fill_diagonal_(float("-inf"))
    idx = scores.topk(topk, dim=1).indices
    return torch.zeros(n, n, dtype=torch.bool, device=k.device).scatter_(1, idx, True)


def mutual_knn_mask(k: torch.Tensor, l: torch.Tensor, topk: int) -> torch.Tensor:
    """alpha(i, j) = 1[i != j, j in kNN_K(i) and j in kNN_L(i)] (Huh et al. 2024, eq. of CKNNA)."""
    return _knn_mask(k, topk) & _knn_mask(l, topk)


def _kernel(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = x.double()
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    return x @ x.T


def cknna(a, b, topk: int = 10, normalize: bool = True) -> float:
    """Centered kernel nearest-neighbour alignment between features a (n, d1) and b (n, d2) of the same n samples.

    With linear kernels K = a a^T, L = b b^T (rows L2-normalised first when ``normalize``, as the paper does,
    so the neighbours are cosine neighbours) and their centred versions Kc = H K H, Lc = H L H:

        align(K, L) = sum_ij alpha_KL(i, j) Kc_ij Lc_ij,   alpha_KL(i, j) = 1[i != j, j in kNN_K(i) ∩ kNN_L(i)]
        CKNNA = align(K, L) / sqrt(align(K, K) align(L, L))

    i.e. CKA whose sum is restricted to mutual k-nearest-neighbour pairs (with topk = n - 1 it is CKA without
    the diagonal terms). 1 for identical features and for features that differ by a rotation or a scale
    (same kernel); near 0 for independent ones. The platonic-rep code masks the *raw* kernel and then applies
    the unbiased HSIC estimator's centring; we centre first and then restrict, as the paper's definition reads.
    """
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    n = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or b.shape[0] != n:
        raise ValueError(f"cknna needs (n, d) feature matrices of the same n, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 1 <= topk <= n - 1:
        raise ValueError(f"cknna: k={topk} needs 1 <= k <= n-1 = {n - 1} (too few samples?)")
    k, l = _kernel(a, normalize), _kernel(b, normalize)
    kc, lc = _center(k), _center(l)
    mask_k, mask_l = _knn_mask(k, topk), _knn_mask(l, topk)
    kl = (kc * lc)[mask_k & mask_l].sum()
    kk = (kc * kc)[mask_k].sum()
    ll = (lc * lc)[mask_l].sum()
    denom = math.sqrt(float(kk) * float(ll))
    return float(kl) / denom if denom > 0 else 0.0


def cknna_reference(a, b, topk: int = 10, normalize: bool = True) -> float:
    """The same quantity with explicit loops (for tests on small inputs): no masks, no matrix centring."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = len(a)
    if normalize:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)

    def kernel(x):
        return [[sum(x[i][d] * x[j][d] for d in range(x.shape[1])) for j in range(n)] for i in range(n)]

    def centred(k):
        row = [sum(k[i]) / n for i in range(n)]
        col = [sum(k[i][j] for i in range(n)) / n for j in range(n)]
        tot = sum(row) / n
        return [[k[i][j] - row[i] - col[j] + tot for j in range(n)] for i in range(n)]

    def neighbours(k, i):  # the topk largest k[i][j], j != i (ties: lower index first)
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-k[i][j], j))
        return set(others[:topk])

    ka, kb = kernel(a), kernel(b)
    ca, cb = centred(ka), centred(kb)
    na, nb = [neighbours(ka, i) for i in range(n)], [neighbours(kb, i) for i in range(n)]

    def align(c1, c2, n1, n2):
        return sum(c1[i][j] * c2[i][j] for i in range(n) for j in range(n) if j in n1[i] and j in n2[i])

    denom = math.sqrt(align(ca, ca, na, na) * align(cb, cb, nb, nb))
    return align(ca, cb, na, nb) / denom if denom > 0 else 0.0


# ------------------------------------------------------------------ linear probe

def _require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise AlignError("the linear probe needs scikit-learn: pip install 'repa[demo]' (or scikit-learn), "
                         "or pass --no-probe to report CKNNA only") from None


def linear_probe(feats, labels, *, train_frac: float = 0.7, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression on standardised ``feats`` (fixed seeded split)."""
    _require_sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = np.asarray(feats, np.float64), np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(train_frac * len(x)))
    if cut < 2 or cut >= len(x):
        raise AlignError(f"--probe-train-frac {train_frac}: leaves no train or test records of {len(x)}")
    tr, te = perm[:cut], perm[cut:]
    scaler = StandardScaler().fit(x[tr])
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(scaler.transform(x[tr]), y[tr])
    return float((clf.predict(scaler.transform(x[te])) == y[te]).mean())


# ------------------------------------------------------------------ records and hidden states

def read_probe_records(shards: str, num: int, teacher_index: int = 0, storage_options=None) -> dict:
    """The first ``num`` records in shard order: moments, token-averaged teacher features, labels, keys."""

    try:
        stream = ShardStream(shards, batch_size=min(num, 256), shuffle=False, storage_options=storage_options)
    except (OSError, ValueError) as e:
        raise AlignError(f"--shards {shards}: cannot read the shard set ({e})") from None
    field = f"feat.{teacher_index}"
    fields = stream.manifest.fields
    if field not in fields:
        have = sorted(f for f in fields if f.startswith("feat.")) or "none"
        raise AlignError(f"--shards {shards}: no teacher field {field} (has {have}); preprocess with a teacher "
                         f"(--enc-type) or pick --teacher-index")
    if "moments" not in fields:
        raise AlignError(f"--shards {shards}: no 'moments' field; not a repa-preprocess shard set")
    stream = ShardStream(shards, batch_size=min(num, 256), shuffle=False, fields=["moments", field],
                         storage_options=storage_options)
    out = {"moments": [], "feat": [], "label": [], "key": []}
    got = 0
    for batch in stream:
        if "label" not in batch:
            raise AlignError(f"--shards {shards}: records carry no label; the probe needs class labels")
        take = min(num - got, len(batch["key"]))
        # clone: the stream may reuse its batch buffers for the next batch
        out["moments"].append(batch["moments"][:take].float().clone())
        out["feat"].append(batch[field][:take].float().mean(1))
        out["label"].append(batch["label"][:take].clone())
        out["key"].append(batch["key"][:take].clone())
        got += take
        if got >= num:
            break
    res = {k: torch.cat(v) for k, v in out.items()}
    res["provenance"] = stream.manifest.provenance
    return res


def _noise(keys: torch.Tensor, seed: int, shape) -> torch.Tensor:
    """eps for record k from a generator seeded by (seed, k): independent of batch size and order."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(k)))
                        for k in keys])


@torch.no_grad()
def pooled_states(model, x0: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor, t: float, *,
                  path_type: str = "linear", layers=None, batch_size: int = 128) -> dict:
    """{block index (1-based): (N, D) token-averaged block outputs, "projector": (N, z)} at noise level t."""

    layers = list(range(1, len(model.blocks) + 1)) if layers is None else list(layers)
    captured: dict = {}
    hooks = [model.blocks[i - 1].register_forward_hook(
        lambda _m, _inp, out, i=i: captured.__setitem__(i, out[0].float().mean(1))) for i in layers]
    out = {i: [] for i in layers}
    out["projector"] = []
    try:
        for s in range(0, len(x0), batch_size):
            x = x0[s:s + batch_size]
            tt = torch.full((len(x),), float(t), dtype=x.dtype, device=x.device)
            alpha, sigma, _, _ = interpolant(tt.view(-1, 1, 1, 1), path_type)
            xt = alpha * x + sigma * eps[s:s + batch_size]
            _, zs = model(xt, tt, labels[s:s + batch_size])
            for i in layers:
                out[i].append(captured[i].cpu())
            out["projector"].append(zs[0].float().mean(1).cpu())
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def _model_inputs(config: dict, records: dict, cond: str, num_classes_null: int | None):
    """x0 (posterior mean, trainer scaling) and the class input of the SiT."""
    kw = config["model"]["kwargs"]
    prov = records["provenance"]
    vae = (config.get("data") or {}).get("vae") or prov.get("vae") or {}
    c = int(kw["in_channels"])
    mean = records["moments"][:, :c]
    if tuple(mean.shape[1:]) != (c, kw["input_size"], kw["input_size"]):
        raise AlignError(f"--shards: latents {tuple(mean.shape[1:])} do not fit the checkpoint's SiT "
                         f"(in_channels {c}, input_size {kw['input_size']}); use the shard set it was trained on")
    scale = torch.tensor(vae.get("scale", [1.0] * c), dtype=torch.float32).view(1, c, 1, 1)
    bias = torch.tensor(vae.get("bias", [0.0] * c), dtype=torch.float32).view(1, c, 1, 1)
    x0 = mean * scale + bias
    if cond == "label":
        return x0, records["label"]
    if num_classes_null is None:
        raise AlignError("--cond null: the checkpoint has no null class (trained with --cfg-prob 0); "
                         "pass --cond label")
    return x0, torch.full_like(records["label"], num_classes_null)


# ------------------------------------------------------------------ the probe

def _null_class(model) -> int | None:
    table = model.y_embedder.embedding_table.num_embeddings
    return model.num_classes if table > model.num_classes else None


def align_probe(model, config: dict, records: dict, *, ts=(0.5,), layers=None, topk: int = 10,
                cond: str = "null", probe: bool = True, train_frac: float = 0.7, seed: int = 0,
                batch_size: int = 128) -> list[dict]:
    """Rows {t, layer, name, cknna, linear_probe_acc} for each t and block (+ projector, + one teacher row)."""
    if cond not in ("null", "label"):
        raise AlignError(f"--cond {cond!r}: use null or label")
    depth = len(model.blocks)
    layers = list(range(1, depth + 1)) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 1 <= i <= depth]
    if bad:
        raise AlignError(f"--layers {bad}: the SiT has blocks 1..{depth}")
    if len(records["label"]) <= topk:
        raise AlignError(f"--num-samples {len(records['label'])}: need more than k={topk} records")
    x0, y = _model_inputs(config, records, cond, _null_class(model))
    eps = _noise(records["key"], seed, x0.shape[1:])
    dev = next(model.parameters()).device
    x0, y, eps = x0.to(dev), y.to(dev), eps.to(dev)
    path_type = getattr(model, "path_type", "linear")
    teacher, labels = records["feat"], records["label"].numpy()
    rows = []
    for t in ts:
        states = pooled_states(model, x0, y, eps, t, path_type=path_type, layers=layers, batch_size=batch_size)
        for key, feats in states.items():
            name = "projector" if key == "projector" else f"block{key}"
            layer = model.encoder_depth if key == "projector" else key
            rows.append({"t": float(t), "layer": int(layer), "name": name, "cknna": cknna(feats, teacher, topk),
                         "linear_probe_acc": linear_probe(feats, labels, train_frac=train_frac, seed=seed)
                         if probe else None})
    if probe:
        rows.append({"t": None, "layer": None, "name": "teacher", "cknna": None,
                     "linear_probe_acc": linear_probe(teacher, labels, train_frac=train_frac, seed=seed)})
    return rows


def plot_alignment(rows: list[dict], title: str):
    """Figure: CKNNA (and linear-probe accuracy, when present) by block, one line per t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_probe = any(r["linear_probe_acc"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_probe else 1, figsize=(9 if has_probe else 5, 3.6), squeeze=False)
    ts = sorted({r["t"] for r in rows if r["t"] is not None})
    panels = [("cknna", "CKNNA with the teacher (k=10)")]
    if has_probe:
        panels.append(("linear_probe_acc", "linear-probe class accuracy"))
    for ax, (key, label) in zip(axes[0], panels):
        for t in ts:
            blocks = [r for r in rows if r["t"] == t and r["name"].startswith("block")]
            line, = ax.plot([r["layer"] for r in blocks], [r[key] for r in blocks], "o-", ms=4, label=f"t={t:g}")
            proj = [r for r in rows if r["t"] == t and r["name"] == "projector"]
            if proj:
                ax.plot([proj[0]["layer"]], [proj[0][key]], "*", ms=11, color=line.get_color())
        teacher = [r for r in rows if r["name"] == "teacher"]
        if key == "linear_probe_acc" and teacher:
            ax.axhline(teacher[0][key], color="k", ls=":", lw=1, label="teacher features")
        ax.set_xlabel("SiT block (star: projector output at the REPA tap)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AlignError(f"{flag} {text!r}: expected a comma list of numbers, e.g. 0.25,0.5,0.75") from None
    if not vals:
        raise AlignError(f"{flag}: empty list")
    return vals


def run(ckpt: str, shards: str, *, t: str = "0.5", layers: str | None = None, num_samples: int = 1000,
        k: int = 10, weights: str = "ema", cond: str = "null", probe: bool = True, train_frac: float = 0.7,
        seed: int = 0, teacher_index: int = 0, batch_size: int = 128, out: str | None = None,
        plot: str | None = None, device: str = "cpu", storage_options=None) -> dict:
    """The CLI's work: load, read, probe, write JSON (+ PNG). Returns the result dict."""

    ts = _floats(t, "--t")
    if any(not 0.0 <= v <= 1.0 for v in ts):
        raise AlignError(f"--t {t}: noise levels must lie in [0, 1] (0 = data, 1 = noise)")
    layer_list = [int(v) for v in _floats(layers, "--layers")] if layers else None
    if num_samples <= k:
        raise AlignError(f"--num-samples {num_samples}: must exceed --k {k}")
    if probe:
        _require_sklearn()
    try:
        model, config = load_sampling_model(ckpt, weights=weights, device=device)
    except CheckpointError as e:
        raise AlignError(str(e)) from None
    records = read_probe_records(shards, num_samples, teacher_index, storage_options)
    rows = align_probe(model, config, records, ts=ts, layers=layer_list, topk=k, cond=cond, probe=probe, train_frac=train_frac,
                       seed=seed, batch_size=batch_size)
    source = config.get("source", {})
    result = {"ckpt": source.get("path", os.path.abspath(ckpt)), "step": source.get("step"),
              "shards": shards, "num_samples": int(len(records["label"])), "k": k, "cond": cond,
              "weights": weights, "teacher_field": f"feat.{teacher_index}", "encoder_depth": model.encoder_depth,
              "metric": "CKNNA (Huh et al. 2024) of token-averaged features, linear kernel on L2-normalised rows",
              "rows": rows}
    out = out or os.path.join(source.get("path", ckpt) if os.path.isdir(ckpt) else os.path.dirname(ckpt) or ".",
                              "align.json")
    atomic_write_bytes(out, json.dumps(result, indent=1).encode())
    png = plot or (out[:-5] if out.endswith(".json") else out) + ".png"
    step = f" step {result['step']}" if result["step"] is not None else ""
    atomic_write_bytes(png, plot_alignment(rows, f"{os.path.basename(result['ckpt'])}{step}: alignment with "
                                                 f"the teacher, {result['num_samples']} records, cond {cond}"))
    result["json"], result["png"] = os.path.abspath(out), os.path.abspath(png)
    return result


def _click_command():
    import click

    @click.command(name="align", context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                                                   "max_content_width": 110},
                   help="Alignment of a SiT checkpoint's hidden states with the teacher features of a shard "
                        "set: CKNNA per block and projector, linear-probe accuracy; JSON + PNG.")
    @click.version_option(package_name="repa", prog_name="repa-eval align")
    @click.argument("ckpt")
    @click.option("--shards", required=True, help="Shard set with moments, label and feat.<i> (repa-preprocess).")
    @click.option("--t", "t", default="0.5", help="Noise level(s) in [0, 1], comma list (0 = data).")
    @click.option("--layers", default=None, help="1-based blocks, comma list [default: all].")
    @click.option("--num-samples", type=int, default=1000, help="Records read (in shard order).")
    @click.option("--k", type=int, default=10, help="Nearest neighbours of CKNNA.")
    @click.option("--weights", type=click.Choice(["ema", "model"]), default="ema")
    @click.option("--cond", type=click.Choice(["null", "label"]), default="null",
                  help="Class input of the SiT: the null class (what it reads from the image) or the label.")
    @click.option("--no-probe", is_flag=True, help="Skip the linear probe (no scikit-learn needed).")
    @click.option("--probe-train-frac", type=float, default=0.7, help="Fixed seeded split of the probe.")
    @click.option("--seed", type=int, default=0, help="Seed of the noise and of the probe split.")
    @click.option("--teacher-index", type=int, default=0, help="Which feat.<i> of the shards.")
    @click.option("--batch-size", type=int, default=128)
    @click.option("--out", default=None, help="Result JSON [default: <ckpt>/align.json].")
    @click.option("--plot", default=None, help="PNG [default: the JSON path with .png].")
    @click.option("--device", default="cpu")
    @click.option("--storage-options", default=None, help="fsspec options as JSON (object stores).")
    def command(ckpt, shards, t, layers, num_samples, k, weights, cond, no_probe, probe_train_frac, seed,
                teacher_index, batch_size, out, plot, device, storage_options):
        so = json.loads(storage_options) if storage_options else None
        try:
            result = run(ckpt, shards, t=t, layers=layers, num_samples=num_samples, k=k, weights=weights,
                         cond=cond, probe=not no_probe, train_frac=probe_train_frac, seed=seed,
                         teacher_index=teacher_index, batch_size=batch_size, out=out, plot=plot, device=device,
                         storage_options=so)
        except AlignError as e:
            raise click.ClickException(str(e)) from None
        for r in result["rows"]:
            acc = "" if r["linear_probe_acc"] is None else f"  probe acc {r['linear_probe_acc']:.3f}"
            tt = "" if r["t"] is None else f"t={r['t']:g} "
            ck = "" if r["cknna"] is None else f"  cknna {r['cknna']:.3f}"
            click.echo(f"{tt}{r['name']:>10s}{ck}{acc}", err=True)
        click.echo(f"plot: {result['png']}", err=True)
        click.echo(result["json"])

    return command


def cli(argv=None) -> int:
    """``repa-eval align ...`` (the repa-eval entry point dispatches here) and ``python -m repa.sampler.align``.

    ``argv`` defaults to the process arguments; a leading ``align`` (the subcommand word of
    ``repa-eval align``) is dropped, so the dispatcher may pass its argv as it is."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["align"]:
        args = args[1:]
    return _click_command().main(args=args, prog_name="repa-eval align", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(cli())
