"""Decode + crop in DataLoader workers: map-style and streaming datasets of (key, uint8 CHW, label, error)."""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .crop import adm_center_crop
from .plan import Options
from .sources import Source
from .stop import StopFlag


def _load_one(source: Source, key: int, record_fn: Callable[[], Any], res: int):
    """-> (key, uint8 CHW tensor or None, label, None or (image name, error)). Never raises."""
    try:
        img, label, _ = source.decode(record_fn())
        arr = adm_center_crop(img, res)
        return key, torch.from_numpy(arr).permute(2, 0, 1).contiguous(), int(label), None
    except Exception as e:  # noqa: BLE001 - reported with the image's name by the main process
        return key, None, -1, (source.describe(key), f"{type(e).__name__}: {e}")


class _MapImages(Dataset):
    def __init__(self, source: Source, keys: np.ndarray, res: int):
        self.source, self.keys, self.res = source, keys, res

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = int(self.keys[i])
        return _load_one(self.source, key, lambda: self.source.get(key), self.res)


class _StreamImages(IterableDataset):
    """The stream positions where `mask` is True. Worker w decodes global batches w, w+W, w+2W, ... so that
    the DataLoader's round-robin over workers returns the items in stream order."""

    def __init__(self, source: Source, mask: np.ndarray, res: int, batch_size: int):
        self.source, self.mask, self.res, self.bs = source, mask, res, batch_size

    def __iter__(self):
        info = get_worker_info()
        nw, w = (info.num_workers, info.id) if info else (1, 0)
        hits = np.flatnonzero(self.mask)
        if not len(hits):
            return
        first, last, pos = int(hits[0]), int(hits[-1]), 0
        for key, record in self.source.stream(first):
            if key > last:
                break
            if not self.mask[key]:
                continue
            if (pos // self.bs) % nw == w:
                yield _load_one(self.source, key, lambda r=record: r, self.res)
            pos += 1


def _collate(items):
    keys = [it[0] for it in items]
    ok = [it for it in items if it[1] is not None]
    images = torch.stack([it[1] for it in ok]) if ok else None
    return {"keys": keys, "ok_keys": [it[0] for it in ok], "labels": [it[2] for it in ok],
            "images": images, "errors": [(it[0], *it[3]) for it in items if it[1] is None]}


def _loader(opts: Options, source: Source, n: int, keys: np.ndarray, device, stop: StopFlag) -> DataLoader:
    if source.indexable:
        ds = _MapImages(source, keys, opts.res)
    else:
        mask = np.zeros(n, dtype=bool)
        mask[keys] = True
        ds = _StreamImages(source, mask, opts.res, opts.batch_size)
    n_workers = opts.num_workers if opts.num_workers is not None else min(8, os.cpu_count() or 1)
    return DataLoader(ds, batch_size=opts.batch_size, shuffle=False, num_workers=n_workers, collate_fn=_collate,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if n_workers else None,
                      persistent_workers=False, worker_init_fn=stop.worker_init() if n_workers else None)
