"""Loader benchmark: our ShardStream vs webdataset, raw sequential read, the reference REPA layout, and S3.

Records of realistic size (moments 8x32x32 fp32 + DINOv2-B features 256x768 bf16 + label, ~430 KB) are
written to shards in a temporary directory; every measurement runs in this one process (num_workers=0) with
the page cache warm (best of ``--repeats`` passes). Prints a table and, as the last line, one JSON object:
  vs_webdataset        our samples/s over webdataset's decode pipeline (frombuffer handler + batched())
  of_raw_read          our bytes/s over `cat shards > /dev/null`
  vs_reference_layout  our samples/s over REPA's layout (PNG + .npy per image, PIL + np.load + default collate)
  s3_vs_local          our samples/s from S3 (moto_server on 127.0.0.1) over local, same records

    .venv/bin/python bench/loader.py [--records 1024] [--batch-size 64] [--s3-records 256]
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

FIELDS = {"moments": FieldSpec((8, 32, 32), "float32"), "label": FieldSpec((), "int64"),
          "feat.0": feature_spec((256, 768), "bf16")}


def write_shards(out: str, n: int, per_shard: int, storage_options=None) -> None:
    g = torch.Generator().manual_seed(0)
    pool = [{"moments": torch.randn(8, 32, 32, generator=g), "feat.0": torch.randn(256, 768, generator=g)}
            for _ in range(8)]
    with ShardSetWriter(out, FIELDS, records_per_shard=per_shard, storage_options=storage_options) as w:
        for k in range(n):
            w.write(k, dict(pool[k % len(pool)], label=k % 1000))
    finalize_manifest(out, FIELDS, {"source": "bench"}, expected_records=n, storage_options=storage_options)


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
    got = sum(len(b["key"]) for b in ShardStream(url, batch, shuffle=True, seed=0, **kw))
    assert got == n, (got, n)


def run_webdataset(tars: list[str], batch: int, n: int) -> None:
    import webdataset as wds

    def handler(key, data):
        ext = key.rsplit(".", 1)[-1] if key.startswith("feat") else key
        if key == "moments":
            return torch.from_numpy(np.frombuffer(data, np.float32).reshape(8, 32, 32))
        if key == "feat.0":
            return torch.from_numpy(np.frombuffer(data, np.int16).reshape(256, 768)).view(torch.bfloat16)
        if key == "label":
            return int(np.frombuffer(data, np.int64)[0])
        return None if ext == "crc" else data

    ds = (wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode(handler)
          .to_tuple("moments", "feat.0", "label").batched(batch))
    got = sum(len(b[2]) for b in ds)
    assert got == n, (got, n)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1024)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reference-records", type=int, default=512)
    ap.add_argument("--s3-records", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, bs = args.records, args.batch_size
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="repa-bench-") as tmp:
        out = os.path.join(tmp, "shards")
        write_shards(out, n, args.per_shard)
        tars = sorted(glob.glob(os.path.join(out, "*.tar")))
        nbytes = sum(os.path.getsize(t) for t in tars)
        rec_kb = nbytes / n / 1024
        print(f"{n} records of {rec_kb:.1f} KB in {len(tars)} shards ({nbytes / 2**20:.0f} MiB), batch {bs}")

        t_raw = best(lambda: subprocess.run(f"cat {' '.join(tars)} > /dev/null", shell=True, check=True), args.repeats)
        t_ours = best(lambda: run_ours(out, bs, n), args.repeats)
        t_nover = best(lambda: run_ours(out, bs, n, verify=False), args.repeats)
        t_wds = best(lambda: run_webdataset(tars, bs, n), args.repeats)
        rows = [("raw read (cat)", t_raw), ("ours (verify=True)", t_ours), ("ours (verify=False)", t_nover),
                ("webdataset decode+batched", t_wds)]
        for name, t in rows:
            print(f"  {name:30s} {n / t:9.1f} samples/s  {nbytes / t / 1e9:6.2f} GB/s")
        res["vs_webdataset"] = t_wds / t_ours
        res["of_raw_read"] = t_raw / t_ours

        ref = os.path.join(tmp, "reference")
        nr = args.reference_records
        make_reference_layout(ref, nr)
        t_ref = best(lambda: run_reference(ref, bs, nr), args.repeats)
        print(f"  {'reference layout (PNG+npy)':30s} {nr / t_ref:9.1f} samples/s")
        res["vs_reference_layout"] = (n / t_ours) / (nr / t_ref)

        if not args.no_s3:
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
                print(f"  {'ours, local (S3 subset)':30s} {ns / t_loc:9.1f} samples/s")
                print(f"  {'ours, S3 (moto, loopback)':30s} {ns / t_s3:9.1f} samples/s")
                res["s3_vs_local"] = t_loc / t_s3
            finally:
                proc.terminate()
                proc.wait()
        else:
            res["s3_vs_local"] = float("nan")
    print(json.dumps({k: round(v, 3) for k, v in res.items()}))


if __name__ == "__main__":
    main()
