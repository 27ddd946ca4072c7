"""Loader benchmark: our ShardStream vs its peers on the same records, in one run, at 256 and 512 px.

Records of realistic size, one per image (exact fields, raw little-endian, no compression):
  256 px: moments 8x32x32 float32 (32 KiB) + label int64 + DINOv2-B features 256x768 bf16 (384 KiB)  ~ 430 KB
  512 px: moments 8x64x64 float32 (128 KiB) + label int64 + DINOv2-B features 1024x768 bf16 (1.5 MiB) ~ 1.7 MB
The same records are written once per format (our tar shards, which webdataset reads as they are; MosaicML MDS
via MDSWriter; Lightning litdata via optimize) and every pipeline yields the same batches of torch tensors
(moments float32, features bfloat16, labels). Every measurement runs in this one process (num_workers=0, one
intra-op thread) with the page cache warm. Each pipeline is built once and timed over epochs, as training
uses it: best of ``--repeats`` epochs after a warm-up epoch (which also fills the page cache).

Integrity checks per record read: ours CRC-32 of every record (verify=True, the default; verify=False checks
only the tar headers); webdataset, MDS (StreamingDataset on a local directory: shard hashes are checked only
when a shard is downloaded from a remote) and litdata check nothing. So the ``*_equal_checks`` ratios compare
ours with verify=False.

Last line, one JSON object:
  vs_webdataset / vs_mds / vs_litdata   our samples/s (CRC verified) over the peer's, 256 px records
  *_equal_checks                        the same with ours at verify=False (no peer verifies anything)
  of_raw_read                           our bytes/s over `cat shards > /dev/null`
  vs_reference_layout                   our samples/s over REPA's layout (PNG + .npy per image)
  s3_vs_local                           our samples/s from S3 (moto_server on 127.0.0.1) over local
  at512                                 the same ratios for the 512 px records
  per_core / node_demand / workers_per_node   records/s per core and what an 8-GPU node consumes

    .venv/bin/python bench/loader.py [--records 1024] [--records-512 256] [--no-s3] [--gpu-json gpu.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from repa.shards import FieldSpec, ShardSetWriter, ShardStream, feature_spec, finalize_manifest  # noqa: E402

SIZES = {256: (32, 256), 512: (64, 1024)}  # resolution -> (latent side, DINOv2-B tokens)


def fields_for(res: int) -> dict:
    side, tokens = SIZES[res]
    return {"moments": FieldSpec((8, side, side), "float32"), "label": FieldSpec((), "int64"),
            "feat.0": feature_spec((tokens, 768), "bf16")}


def record_pool(res: int) -> list[dict]:
    """8 distinct records, reused round-robin (the content does not change any reader's cost)."""
    side, tokens = SIZES[res]
    g = torch.Generator().manual_seed(0)
    return [{"moments": torch.randn(8, side, side, generator=g),
             "feat.0": torch.randn(tokens, 768, generator=g).to(torch.bfloat16)} for _ in range(8)]


def write_shards(out: str, n: int, per_shard: int, storage_options=None, res: int = 256) -> None:
    pool, fields = record_pool(res), fields_for(res)
    with ShardSetWriter(out, fields, records_per_shard=per_shard, storage_options=storage_options) as w:
        for k in range(n):
            w.write(k, dict(pool[k % len(pool)], label=k % 1000))
    finalize_manifest(out, fields, {"source": "bench"}, expected_records=n, storage_options=storage_options)


def best(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` runs (after one warm-up run that fills the page cache)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_ours(url: str, batch: int, n: int, **kw) -> None:
    make_ours(url, batch, n, **kw)()


def epochs(iterable, n: int, count):
    """One pass over a pipeline built once (as training builds it once and runs many epochs over it)."""
    def epoch():
        got = sum(count(b) for b in iterable)
        assert got == n, (got, n)
    return epoch


def make_ours(url: str, batch: int, n: int, **kw):
    return epochs(ShardStream(url, batch, shuffle=True, seed=0, **kw), n, lambda b: len(b["key"]))


def collate(samples: list[dict]) -> dict:
    """The batch every peer yields: moments float32, features bf16 (stored as int16 bits), labels int64."""
    return {"moments": torch.stack([torch.as_tensor(s["moments"]) for s in samples]),
            "feat.0": torch.stack([torch.as_tensor(s["feat"]) for s in samples]).view(torch.bfloat16),
            "label": torch.tensor([int(s["label"]) for s in samples])}


def make_webdataset(tars: list[str], batch: int, n: int, res: int = 256):
    import webdataset as wds
    side, tokens = SIZES[res]

    def handler(key, data):
        key = key.lstrip(".")  # webdataset 1.x passes ".moments"; a handler matching "moments" never fires
        if key == "moments":
            return np.frombuffer(data, np.float32).reshape(8, side, side)
        if key == "feat.0":
            return np.frombuffer(data, np.int16).reshape(tokens, 768)
        if key == "label":
            return int(np.frombuffer(data, np.int64)[0])
        return None  # the .crc entries: webdataset has no use for them

    ds = (wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode(handler)
          .to_tuple("moments", "feat.0", "label").batched(batch, collation_fn=lambda rows: collate(
              [{"moments": m, "feat": f, "label": y} for m, f, y in rows])))
    return epochs(ds, n, lambda b: len(b["label"]))


def write_mds(out: str, n: int, res: int, shard_bytes: int) -> None:
    """MosaicML streaming MDS: the same records as fixed-shape ndarray columns, no compression, no hashes."""
    from streaming import MDSWriter
    side, tokens = SIZES[res]
    cols = {"moments": f"ndarray:float32:8,{side},{side}", "feat": f"ndarray:int16:{tokens},768", "label": "int"}
    pool = record_pool(res)
    with MDSWriter(out=out, columns=cols, compression=None, size_limit=shard_bytes) as w:
        for k in range(n):
            r = pool[k % len(pool)]
            w.write({"moments": r["moments"].numpy(), "feat": r["feat.0"].view(torch.int16).numpy(),
                     "label": k % 1000})


def make_mds(out: str, batch: int, n: int):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()
    ds = StreamingDataset(local=out, batch_size=batch, shuffle=True, shuffle_seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0, collate_fn=collate)
    return epochs(dl, n, lambda b: len(b["label"]))


def _litdata_item(k: int) -> dict:
    # torch tensors: litdata's tensor serializer reads them back zero-copy (its numpy one copies every array)
    r = _LIT_POOL[k % len(_LIT_POOL)]
    return {"moments": r["moments"], "feat": r["feat.0"].view(torch.int16), "label": k % 1000}


_LIT_POOL: list = []


def write_litdata(out: str, n: int, res: int, shard_bytes: int) -> None:
    """Lightning litdata: litdata.optimize over the same records (torch tensors, no compression)."""
    import litdata
    _LIT_POOL[:] = record_pool(res)
    litdata.optimize(fn=_litdata_item, inputs=list(range(n)), output_dir=out, chunk_bytes=shard_bytes,
                     num_workers=1, start_method="fork")


def make_litdata(out: str, batch: int, n: int):
    import litdata
    ds = litdata.StreamingDataset(out, shuffle=True, seed=0)
    dl = litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=0, collate_fn=collate)
    return epochs(dl, n, lambda b: len(b["label"]))


def make_reference_layout(root: str, n: int) -> None:
    """REPA's preprocessing output: images/{5}/img{8}.png (uncompressed) + vae-sd/{5}/img-mean-std-{8}.npy."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mom = rng.standard_normal((8, 32, 32)).astype(np.float32)
    labels = []
    for i in range(n):
        d = f"{i // 1000:05d}"
        os.makedirs(os.path.join(root, "images", d), exist_ok=True)
        os.makedirs(os.path.join(root, "vae-sd", d), exist_ok=True)
        Image.fromarray(img).save(os.path.join(root, "images", d, f"img{i:08d}.png"), compress_level=0)
        name = f"{d}/img-mean-std-{i:08d}.npy"
        np.save(os.path.join(root, "vae-sd", name), mom)
        labels.append([name, i % 1000])
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)


class ReferenceDataset(torch.utils.data.Dataset):
    """What REPA's dataset.py does per item: PIL image -> uint8 CHW tensor, np.load moments, label."""

    def __init__(self, root: str):
        self.images = sorted(glob.glob(os.path.join(root, "images", "*", "*.png")))
        self.feats = sorted(glob.glob(os.path.join(root, "vae-sd", "*", "*.npy")))
        with open(os.path.join(root, "vae-sd", "dataset.json")) as f:
            self.labels = dict(json.load(f)["labels"])
        self.root = root

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        with open(self.images[i], "rb") as f:
            image = np.array(Image.open(f).convert("RGB")).transpose(2, 0, 1)
        rel = os.path.relpath(self.feats[i], os.path.join(self.root, "vae-sd")).replace(os.sep, "/")
        return torch.from_numpy(image), torch.from_numpy(np.load(self.feats[i])), torch.tensor(self.labels[rel])


def run_reference(root: str, batch: int, n: int) -> None:
    dl = torch.utils.data.DataLoader(ReferenceDataset(root), batch_size=batch, shuffle=True, num_workers=0)
    got = sum(len(b[2]) for b in dl)
    assert got == n


def start_moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    return proc, url


# Published training rates (img/s per GPU) used when no GPU bench JSON is given; see BENCHMARKS.md "Loader peers".
# DiT-XL/2 (= SiT-XL/2's architecture) at 256 px on 8 H800, local batch 128: 100 img/s/GPU plain, 175 img/s/GPU
# with fused kernels (Open-Sora v1.1 docs/acceleration.md). Other sizes scale by forward GFLOPs from the DiT paper
# (Peebles & Xie 2023, Table 4): XL/2 118.6 (256 px) and 524.6 (512 px), B/2 23.0 (256 px); B/2 at 512 px ~ 23.0
# x 524.6 / 118.6 = 101.7 (same growth as XL/2, an estimate).
PUBLISHED_XL2_256 = 175.0
GFLOPS = {("xl2", 256): 118.6, ("xl2", 512): 524.6, ("b2", 256): 23.0, ("b2", 512): 23.0 * 524.6 / 118.6}


def node_demand(gpu_json: str | None) -> tuple[dict, str]:
    """Records/s an 8-GPU node consumes per (model, res): 8 x per-GPU img/s (measured or published)."""
    base = {m: PUBLISHED_XL2_256 * GFLOPS[("xl2", 256)] / GFLOPS[(m, 256)] for m in ("xl2", "b2")}
    source = "published: Open-Sora docs/acceleration.md DiT-XL/2 175 img/s/GPU (8xH800), scaled by DiT GFLOPs"
    if gpu_json:
        with open(gpu_json) as f:
            gpu = json.loads(f.read().strip().splitlines()[-1])
        if gpu.get("xl2_bf16_img_s") and gpu.get("b2_bf16_img_s") and not gpu.get("quick"):
            base = {"xl2": gpu["xl2_bf16_img_s"], "b2": gpu["b2_bf16_img_s"]}
            source = f"measured by bench/gpu.py on {gpu.get('device')} (256 px), 512 px scaled by DiT GFLOPs"
    return {f"{m}_{r}": round(8 * base[m] * GFLOPS[(m, 256)] / GFLOPS[(m, r)], 1)
            for m in ("xl2", "b2") for r in (256, 512)}, source


def bench_peers(tmp: str, res: int, n: int, per_shard: int, bs: int, repeats: int) -> dict:
    """Every pipeline on the same n records of one size; returns samples/s per pipeline and bytes/record."""
    out = os.path.join(tmp, f"ours{res}")
    write_shards(out, n, per_shard, res=res)
    tars = sorted(glob.glob(os.path.join(out, "*.tar")))
    nbytes = sum(os.path.getsize(t) for t in tars)
    shard_bytes = nbytes // len(tars)
    missing = set()
    peers = (("mds (mosaicml-streaming)", "mds", write_mds, 'pip install --no-deps mosaicml-streaming (see the '
              'comment at pyproject.toml\'s "bench" extra)'),
             ("litdata", "lit", write_litdata, 'pip install -e ".[bench]"'))
    for name, folder, write, hint in peers:
        try:
            write(os.path.join(tmp, f"{folder}{res}"), n, res, shard_bytes)
        except ImportError as e:  # a peer that is not installed is skipped, and said so
            print(f"  {name}: not installed ({e.name}); {hint}", flush=True)
            missing.add(name)
    print(f"{res} px: {n} records of {nbytes / n / 1e3:.0f} KB in {len(tars)} shards ({nbytes / 2**20:.0f} MiB), "
          f"batch {bs}", flush=True)
    cat = lambda: subprocess.run(f"cat {' '.join(tars)} > /dev/null", shell=True, check=True)  # noqa: E731
    runs = {"raw read (cat)": lambda: cat,
            "ours (CRC-32 verified)": lambda: make_ours(out, bs, n),
            "ours (verify=False)": lambda: make_ours(out, bs, n, verify=False),
            "webdataset": lambda: make_webdataset(tars, bs, n, res),
            "mds (mosaicml-streaming)": lambda: make_mds(os.path.join(tmp, f"mds{res}"), bs, n),
            "litdata": lambda: make_litdata(os.path.join(tmp, f"lit{res}"), bs, n)}
    rate = {}
    for name, build in runs.items():
        if name in missing:
            continue
        try:
            rate[name] = n / best(build(), repeats)
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, the others still run
            print(f"  {name:28s} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"  {name:28s} {rate[name]:9.1f} samples/s  {rate[name] * nbytes / n / 1e9:6.2f} GB/s", flush=True)
    return {"rate": rate, "record_bytes": nbytes / n, "out": out}


def ratios(rate: dict) -> dict:
    r = lambda a, b: round(rate[a] / rate[b], 3) if a in rate and b in rate else None  # noqa: E731
    ours, eq = "ours (CRC-32 verified)", "ours (verify=False)"
    return {"vs_webdataset": r(ours, "webdataset"), "vs_mds": r(ours, "mds (mosaicml-streaming)"),
            "vs_litdata": r(ours, "litdata"), "vs_webdataset_equal_checks": r(eq, "webdataset"),
            "vs_mds_equal_checks": r(eq, "mds (mosaicml-streaming)"), "vs_litdata_equal_checks": r(eq, "litdata"),
            "of_raw_read": r(ours, "raw read (cat)"), "crc_cost": r(eq, ours)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1024, help="256 px records")
    ap.add_argument("--records-512", type=int, default=256, help="512 px records (0: skip 512 px)")
    ap.add_argument("--per-shard", type=int, default=128, help="256 px records per shard (512 px: a quarter)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reference-records", type=int, default=512)
    ap.add_argument("--s3-records", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--gpu-json", default=None, help="bench/gpu.py output: use its measured img/s for the node")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, bs = args.records, args.batch_size
    with tempfile.TemporaryDirectory(prefix="repa-bench-") as tmp:
        p256 = bench_peers(tmp, 256, n, args.per_shard, bs, args.repeats)
        res = ratios(p256["rate"])
        ours = p256["rate"].get("ours (CRC-32 verified)")
        ref = os.path.join(tmp, "reference")
        nr = args.reference_records
        make_reference_layout(ref, nr)
        t_ref = best(lambda: run_reference(ref, bs, nr), args.repeats)
        print(f"  {'reference layout (PNG+npy)':28s} {nr / t_ref:9.1f} samples/s", flush=True)
        res["vs_reference_layout"] = round(ours / (nr / t_ref), 3) if ours else None
        res["s3_vs_local"] = None if args.no_s3 else bench_s3(tmp, args, bs)
        per_core = {"256": round(ours, 1) if ours else None}
        if args.records_512:
            p512 = bench_peers(tmp, 512, args.records_512, max(1, args.per_shard // 4), bs, args.repeats)
            res["at512"] = ratios(p512["rate"])
            per_core["512"] = round(p512["rate"].get("ours (CRC-32 verified)", 0), 1) or None
    demand, source = node_demand(args.gpu_json)
    res["per_core"] = per_core
    res["node_demand"] = demand
    res["node_demand_source"] = source
    res["workers_per_node"] = {k: round(v / per_core[k.split("_")[1]], 2) if per_core.get(k.split("_")[1]) else None
                               for k, v in demand.items()}
    for k, v in demand.items():
        print(f"  8-GPU node, {k}: consumes {v:8.1f} records/s = {res['workers_per_node'][k]} loader cores "
              f"(ours, CRC verified)", flush=True)
    print(json.dumps(res))


def bench_s3(tmp: str, args, bs: int) -> float:
    proc, endpoint = start_moto()
    try:
        import s3fs
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
        ns = args.s3_records
        local_sub = os.path.join(tmp, "sub")
        write_shards(local_sub, ns, args.per_shard)
        write_shards("s3://bench/sub", ns, args.per_shard)
        t_loc = best(lambda: run_ours(local_sub, bs, ns), args.repeats)
        t_s3 = best(lambda: run_ours("s3://bench/sub", bs, ns), args.repeats)
        print(f"  {'ours, local (S3 subset)':28s} {ns / t_loc:9.1f} samples/s")
        print(f"  {'ours, S3 (moto, loopback)':28s} {ns / t_s3:9.1f} samples/s")
        return round(t_loc / t_s3, 3)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
