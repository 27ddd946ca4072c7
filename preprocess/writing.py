"""The writer thread (records -> shards, skip lists) and the final accounting of a shard set."""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import numpy as np

from repa.shards import ShardWriter, completed_shards

from .plan import SKIP_DIR, Options, shard_name
from .resume import PreprocessError
from .resume import join as _join
from .resume import read_json as _read_json
from .resume import write_json as _write_json


class _ShardWriters(threading.Thread):
    """Encodes and writes records in the background. Shard j is closed once all its keys are accounted for
    (written or skipped); its skip list is written just before, so a complete shard always has it."""

    def __init__(self, opts: Options, out: str, fields, shard_of: Callable[[int], int], size_of: dict,
                 on_closed: Callable[[int, Any], None]):
        super().__init__(daemon=True)
        self.opts, self.out, self.fields = opts, out, fields
        self.shard_of, self.size_of, self.on_closed = shard_of, size_of, on_closed
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.open: dict[int, Any] = {}
        self.seen: dict[int, int] = {}
        self.skipped: dict[int, list] = {}
        self.error: BaseException | None = None
        self.cancelled = threading.Event()

    def put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self):
        try:
            while (item := self.q.get()) is not None and not self.cancelled.is_set():
                self._write_batch(*item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by put()/finish()
            self.error = e

    def finish(self):
        """Write what is queued, stop, re-raise a writing error."""
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def cancel(self):
        """Stop after the current batch (error path); the caller then aborts the open shards."""
        self.cancelled.set()
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self.join()

    def _writer(self, j: int):
        if j not in self.open:
            self.open[j] = ShardWriter(self.out, self.fields, shard_name=shard_name(j),
                                       storage_options=self.opts.storage_options)
            self.seen[j] = 0
            self.skipped[j] = []
        return self.open[j]

    def _write_batch(self, keys, labels, arrays, skipped):
        for i, key in enumerate(keys):
            sample = {name: a[i] for name, a in arrays.items()}
            sample["label"] = np.int64(labels[i])
            j = self.shard_of(key)
            self._writer(j).write(int(key), sample)
            self._count(j)
        for key, path, msg in skipped:
            j = self.shard_of(key)
            self._writer(j)
            self.skipped[j].append({"key": int(key), "path": path, "error": msg})
            self._count(j)

    def _count(self, j: int):
        self.seen[j] += 1
        if self.seen[j] == self.size_of[j]:
            _write_json(_join(self.out, SKIP_DIR, f"{shard_name(j)[:-4]}.json"),
                        sorted(self.skipped[j], key=lambda s: s["key"]), self.opts.storage_options)
            info = self.open.pop(j).close()
            self.on_closed(j, info)

    def abort(self):
        for w in self.open.values():
            try:
                w.abort()
            except Exception:  # noqa: BLE001 - best effort cleanup on the error path
                pass
        self.open.clear()


def _check_complete(out: str, plan: list[np.ndarray], so) -> list[dict]:
    """Every planned shard is complete and holds its keys minus its skipped ones; returns all skipped."""
    done = completed_shards(out, storage_options=so)
    skipped, problems = [], []
    for j, keys in enumerate(plan):
        info = done.get(shard_name(j))
        sk = _read_json(_join(out, SKIP_DIR, f"{shard_name(j)[:-4]}.json"), so) if info else None
        if info is None or sk is None:
            problems.append(f"{shard_name(j)} is missing")
        elif info.num_records + len(sk) != len(keys):
            problems.append(f"{shard_name(j)} has {info.num_records} records + {len(sk)} skipped, "
                            f"planned {len(keys)}")
        else:
            skipped += sk
    if problems:
        raise PreprocessError(f"{out}: the shard set is incomplete ({'; '.join(problems[:5])}"
                              f"{'; ...' if len(problems) > 5 else ''}); rerun the same command to finish it")
    return sorted(skipped, key=lambda s: s["key"])
