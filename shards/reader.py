"""Streaming reader: ShardStream (an IterableDataset of collated batches) and ShardLoader (exact resume).

Sampling plan of epoch e (pure arithmetic, identical on every rank and worker):
  1. the shard list is permuted by a generator seeded with (seed, e) (identity when shuffle=False);
  2. their records form one sequence of N records; slot s = rank * W + worker of S = world_size * W slots
     reads positions [floor(s N / S), floor((s + 1) N / S)): every record exactly once per epoch, any N, S;
  3. a slot reads its range in windows of ``shuffle_window`` records (one range read per shard the window
     touches) and emits each window in a permutation seeded by (seed, e, s, window index);
  4. batches are consecutive records of the slot's stream; in infinite mode the stream runs into the next
     epoch (a batch may straddle epochs); in finite mode the last partial batch is kept unless drop_last.

Because records have a fixed stride, a stream can start at any record offset without reading what it skips:
offset -> (epoch, window, position in window). ShardLoader uses that for exact mid-epoch resume.
"""
from __future__ import annotations

import atexit
import functools
import signal
import weakref

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import storage
from .codecs import decode_batch
from .dist import context as dist_context
from .manifest import read_manifest
from .tario import RecordCodec
from .verify import quick_check

_META = ("_worker", "_skipped")
# pre-emption signals DataLoader workers ignore (SLURM signals the whole group; the main process handles them)
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class ShardError(RuntimeError):
    """A shard is truncated or a record is corrupt; the message names the shard URL and the record."""


def _dist_rank_world() -> tuple[int, int]:
    ctx = dist_context()
    return ctx.rank, ctx.world_size


def slot_range(slot: int, num_slots: int, n: int) -> tuple[int, int]:
    """Contiguous range of the epoch sequence read by ``slot``: [floor(s n / S), floor((s + 1) n / S))."""
    return slot * n // num_slots, (slot + 1) * n // num_slots


class ShardStream(IterableDataset):
    """Collated batches from a shard set (local directory or fsspec URL with manifest.json).

    Yields dicts {"key": int64 (B,), "label": int64 (B,) if present, <field>: (B, *shape)}; int8 features
    are dequantized to their decoded dtype, fp16/bf16 kept. ``skipped`` counts records skipped with skip_bad.
    Use ``set_epoch(e)`` between finite epochs (ShardLoader does it for you).
    """

    def __init__(self, url, batch_size, *, fields=None, shuffle=True, seed=0, infinite=False,
                 shuffle_window=512, rank=None, world_size=None, drop_last=False,
                 skip_bad=False, verify=True, storage_options=None):
        self.url = str(url)
        self.storage_options = storage_options
        self.manifest = m = read_manifest(self.url, storage_options)
        if batch_size < 1 or shuffle_window < 1:
            raise ValueError(f"batch_size ({batch_size}) and shuffle_window ({shuffle_window}) must be >= 1")
        if fields is None:
            fields = list(m.fields)
        unknown = [f for f in fields if f not in m.fields]
        if unknown:
            raise ValueError(f"fields {unknown} are not in {self.url} (it has {list(m.fields)})")
        if "label" in m.fields and "label" not in fields:
            fields = ["label", *fields]
        self.fields = list(dict.fromkeys(fields))
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.infinite, self.shuffle_window, self.drop_last = bool(infinite), int(shuffle_window), bool(drop_last)
        self.skip_bad, self.verify = bool(skip_bad), bool(verify)
        dr, dw = _dist_rank_world()
        self.rank = dr if rank is None else int(rank)
        self.world_size = dw if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.codec = RecordCodec(m.fields)
        self.num_records = m.num_records
        self._counts = np.array([s.num_records for s in m.shards], np.int64)
        self.epoch = 0
        self.skipped = 0
        self._resume: dict | None = None  # set by ShardLoader: {"rotation": r, "batches": [per logical worker]}
        self._window_buf = None
        self._meta = False  # ShardLoader asks for "_worker"/"_skipped" entries (stripped before the consumer)

    def __getstate__(self):  # what DataLoader workers receive: no buffers or open files
        d = dict(self.__dict__)
        d["_window_buf"] = None
        d.pop("_files", None)
        return d

    # -- plan ----------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self._counts)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def slot_size(self, slot: int, num_slots: int) -> int:
        a, b = slot_range(slot, num_slots, self.num_records)
        return b - a

    def batches_per_epoch(self, slot: int, num_slots: int) -> int:
        n = self.slot_size(slot, num_slots)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _window_perm(self, epoch: int, slot: int, window: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, slot, window]).permutation(n)

    # -- reading -------------------------------------------------------------------------------------------
    def _shard_url(self, i: int) -> str:
        return storage.join(self.url, self.manifest.shards[i].name)

    def _file(self, i: int) -> storage.RangeFile:
        f = self._files.get(i)
        if f is None:
            info = self.manifest.shards[i]
            try:
                f = storage.RangeFile(self._shard_url(i), self.storage_options)
            except FileNotFoundError:
                f = None
            if f is None or f.size is None:  # listed in the manifest, absent from storage
                if not self.skip_bad:
                    raise ShardError(f"{self._shard_url(i)}: listed in the manifest ({info.num_records} records) but "
                                     "missing (deleted, or the shard set changed under the run); run repa-verify on "
                                     "the set and rerun the same repa-preprocess command (it redoes missing shards), "
                                     "or pass skip_bad=True to skip its records") from None
                f = _MissingFile(self._shard_url(i))
            if f.size != info.nbytes and not (self.skip_bad and f.size < info.nbytes):
                what = "shorter" if f.size < info.nbytes else "longer"
                raise ShardError(f"{f.url}: {f.size} bytes, but the manifest says {info.nbytes} "
                                 f"({info.num_records} records): the shard is {what} than written (truncated or "
                                 "replaced). Re-create it (re-run repa-preprocess, which redoes shards without "
                                 "a valid sidecar) or pass skip_bad=True to skip its missing records")
            problem = quick_check(f, info, self.codec) if f.size == info.nbytes else None
            if problem:  # same size, other content: a shard of another set (or a swapped one)
                if not self.skip_bad:
                    f.close()
                    raise ShardError(f"{f.url}: not the shard this manifest lists: {problem}. The shard set "
                                     "changed under the run: run repa-verify on it and rerun the same "
                                     "repa-preprocess command (it rewrites bad shards), or pass skip_bad=True")
                f.close()
                f = _MissingFile(f.url)  # skip all of its records: none of them is the one listed
            self._files[i] = f
        return f

    def _read_window(self, order, cum, p0, p1, buf):
        """Read positions [p0, p1) of the epoch sequence into buf rows; returns (rows view, where, problems)."""
        rb = self.codec.record_bytes
        n = p1 - p0
        win = buf[:n]
        where = np.empty((n, 2), np.int64)  # (shard index, record index in shard) per row
        problems: list[str | None] = [None] * n
        k = int(np.searchsorted(cum, p0, side="right")) - 1
        while k < len(order) and cum[k] < p1:
            a, b = max(p0, int(cum[k])), min(p1, int(cum[k + 1]))
            if b > a:
                si, r0, r1 = int(order[k]), a - int(cum[k]), b - int(cum[k])
                rows = slice(a - p0, b - p0)
                if a == p0 and b == p1:  # the whole window lies in one local shard: map it instead of copying
                    mapped = self._file(si).view(r0 * rb, n * rb)
                    if mapped is not None:
                        where[:, 0], where[:, 1] = si, np.arange(r0, r1)
                        return mapped.reshape(n, rb), where, problems
                got = self._file(si).readinto(r0 * rb, win[rows])
                where[rows, 0] = si
                where[rows, 1] = np.arange(r0, r1)
                for j in range(got // rb, r1 - r0):
                    problems[a - p0 + j] = "record missing: the shard ends before it (truncated)"
            k += 1
        return win, where, problems

    def _check(self, win, where, problems):
        """Verify headers (+ CRC); returns (keys, good row mask). Raises ShardError unless skip_bad."""
        keys, hproblems = self.codec.check_headers(win)
        bad = np.zeros(len(win), bool)
        for i in range(len(win)):
            p = problems[i] or hproblems[i]
            if p is None and self.verify:
                p = self.codec.check_crc(memoryview(win[i]))
            if p is not None:
                si, ri = where[i]
                if not self.skip_bad:
                    key = f"key {keys[i]}" if keys[i] >= 0 else "key unreadable"
                    raise ShardError(f"{self._shard_url(int(si))}: record {int(ri)} ({key}): {p}. Re-create this "
                                     "shard (re-run repa-preprocess) or pass skip_bad=True to skip bad records")
                bad[i] = True
        return keys, ~bad

    def _chunks(self, slot: int, num_slots: int, start: int):
        """Yield (window rows, emission order of good rows, keys) from record offset ``start`` of the slot's stream."""
        n_s = self.slot_size(slot, num_slots)
        if n_s == 0:
            return
        a, _ = slot_range(slot, num_slots, self.num_records)
        wsz = self.shuffle_window
        shape = (min(wsz, n_s), self.codec.record_bytes)
        buf = getattr(self, "_window_buf", None)
        if buf is None or buf.shape != shape:  # reused across windows and epochs: no page faults per window
            buf = self._window_buf = np.empty(shape, np.uint8)
        epoch = self.epoch + start // n_s if self.infinite else self.epoch
        pos = start % n_s if self.infinite else start
        while True:
            if pos >= n_s:
                if not self.infinite:
                    return
                epoch, pos = epoch + 1, 0
            order = self.shard_order(epoch)
            cum = np.concatenate([[0], np.cumsum(self._counts[order])])
            w = pos // wsz
            w0, w1 = a + w * wsz, a + min((w + 1) * wsz, n_s)
            win, where, problems = self._read_window(order, cum, w0, w1, buf)
            keys, good = self._check(win, where, problems)
            perm = self._window_perm(epoch, slot, w, w1 - w0)[pos - w * wsz:]
            if not good.all():
                self.skipped += int((~good[perm]).sum())
                perm = perm[good[perm]]
            yield win, perm, keys
            pos = w1 - a

    # -- batching ------------------------------------------------------------------------------------------
    def _new_batch(self, shared: bool):
        def alloc(shape, dtype):
            if shared:  # a worker: allocate in shared memory so the DataLoader queue does not copy it again
                numel = int(np.prod(shape))
                st = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
                return torch.empty(0, dtype=dtype).set_(st, 0, shape)
            return torch.empty(shape, dtype=dtype)

        b = self.batch_size
        keys = alloc((b,), torch.int64)
        raw = {f: alloc((b, self.manifest.fields[f].nbytes), torch.uint8) for f in self.fields}
        return keys, raw

    def _finish(self, keys, raw, n, worker):
        out = {"key": keys[:n]}
        for f in self.fields:
            out[f] = decode_batch(raw[f][:n], self.manifest.fields[f])
        if self._meta:
            out["_worker"] = torch.tensor(worker)
            out["_skipped"] = torch.tensor(self.skipped)
        return out

    def __iter__(self):
        info = get_worker_info()
        num_workers, phys = (info.num_workers, info.id) if info is not None else (1, 0)
        resume = self._resume or {}
        worker = (phys + int(resume.get("rotation", 0))) % num_workers
        counts = resume.get("batches") or [0] * num_workers
        if len(counts) != num_workers:
            raise ValueError(f"ShardStream resume state is for {len(counts)} workers, the DataLoader has {num_workers}")
        start_batches = counts[worker]
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        self._files: dict[int, storage.RangeFile] = {}
        members = {m.name: m for m in self.codec.data_members}
        spans = [(f, members[f].data_offset, members[f].nbytes) for f in self.fields]
        b = self.batch_size
        shared = info is not None
        keys_b, raw = self._new_batch(shared)
        raw_np = {f: t.numpy() for f, t in raw.items()}
        fill = 0
        try:
            for win, perm, keys in self._chunks(slot, num_slots, start_batches * b):
                i = 0
                while i < len(perm):
                    k = min(b - fill, len(perm) - i)
                    sel = perm[i:i + k]
                    keys_b[fill:fill + k] = torch.from_numpy(keys[sel])
                    for f, off, nb in spans:
                        dst = raw_np[f]
                        for r, src in enumerate(sel, start=fill):
                            dst[r] = win[src, off:off + nb]
                    fill += k
                    i += k
                    if fill == b:
                        yield self._finish(keys_b, raw, b, worker)
                        keys_b, raw = self._new_batch(shared)
                        raw_np = {f: t.numpy() for f, t in raw.items()}
                        fill = 0
            if fill and not self.drop_last:
                yield self._finish(keys_b, raw, fill, worker)
        finally:
            for f in self._files.values():
                f.close()
            self._files = {}


class _MissingFile:
    """Stands in for a missing shard with skip_bad: zero bytes, so every record reads as missing (skipped)."""

    size = 0

    def __init__(self, url: str):
        self.url = url

    def readinto(self, offset, out) -> int:
        return 0

    def view(self, offset, nbytes) -> None:
        return None  # nothing to map: the reader falls back to readinto, which reads nothing (all skipped)

    def close(self) -> None:
        pass


def _delivered(n: int, totals: list[int | None]) -> tuple[list[int], int]:
    """Batches each worker delivered after ``n`` batches of DataLoader's in-order round robin, and the worker
    that delivers next (exhausted workers are skipped; totals[w] None = infinite)."""
    nw = len(totals)
    big = n + 1
    t = [big if x is None else x for x in totals]
    lo, hi = 0, max(t)  # largest number of complete rounds r with sum(min(t_w, r)) <= n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(x, mid) for x in t) <= n:
            lo = mid
        else:
            hi = mid - 1
    counts = [min(x, lo) for x in t]
    rest = n - sum(counts)
    nxt = 0
    for w in range(nw):
        if t[w] > lo and rest > 0:
            counts[w] += 1
            rest -= 1
            nxt = (w + 1) % nw
    if rest:
        raise ValueError(f"loader state says {n} batches were delivered, more than the epoch has ({sum(t)})")
    return counts, nxt


class ShardLoader:
    """DataLoader over a ShardStream that counts delivered batches and resumes exactly.

    Finite streams: each ``iter(loader)`` is one epoch (the epoch advances when it is exhausted).
    Infinite streams: one endless iterator. ``state_dict()``/``load_state_dict()`` give exact resume for the
    same world size, worker count, batch size, seed and shuffle settings (with skip_bad, only as long as no
    record was skipped before the save).
    """

    def __init__(self, stream: ShardStream, num_workers: int = 2, pin_memory: bool | None = None,
                 prefetch_factor: int = 2, ignore_signals: tuple[int, ...] = WORKER_IGNORED_SIGNALS):
        self.stream = stream
        self.ignore_signals = tuple(int(s) for s in ignore_signals)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.batches = 0  # delivered to the consumer (this epoch when finite, in total when infinite)
        self.skipped_per_worker: dict[int, int] = {}

    @property
    def skipped(self) -> int:
        return sum(self.skipped_per_worker.values()) if self.num_workers else self.stream.skipped

    def _totals(self) -> list[int | None]:
        w = max(1, self.num_workers)
        s = self.stream
        if s.infinite:
            return [None] * w
        return [s.batches_per_epoch(s.rank * w + i, s.world_size * w) for i in range(w)]

    def __len__(self) -> int:
        if self.stream.infinite:
            raise TypeError("an infinite ShardLoader has no length")
        return sum(self._totals())

    def __iter__(self):
        totals = self._totals()
        counts, nxt = _delivered(self.batches, totals)
        s = self.stream
        s.set_epoch(self.epoch)
        s._resume = {"rotation": nxt, "batches": counts}
        s._meta = True
        kw = dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.num_workers:
            kw["prefetch_factor"] = self.prefetch_factor
            kw["worker_init_fn"] = functools.partial(_ignore_signals, self.ignore_signals)
        it = iter(DataLoader(s, batch_size=None, **kw))
        if self.num_workers:
            _track_workers(it)
        try:
            for batch in it:
                w, sk = int(batch.pop("_worker")), int(batch.pop("_skipped"))
                if self.num_workers:
                    self.skipped_per_worker[w] = sk
                self.batches += 1
                yield batch
        finally:
            s._resume, s._meta = None, False
        if not s.infinite:
            self.epoch += 1
            self.batches = 0

    def state_dict(self) -> dict:
        s = self.stream
        return {"batches": self.batches, "epoch": self.epoch, "seed": s.seed, "world_size": s.world_size,
                "rank": s.rank, "num_workers": self.num_workers, "batch_size": s.batch_size,
                "shuffle": s.shuffle, "shuffle_window": s.shuffle_window, "infinite": s.infinite,
                "drop_last": s.drop_last, "num_records": s.num_records}

    def load_state_dict(self, d: dict) -> None:
        s = self.stream
        mine = self.state_dict()
        for k in ("world_size", "num_workers", "batch_size", "seed", "shuffle", "shuffle_window",
                  "infinite", "drop_last", "num_records"):
            if k in d and d[k] != mine[k]:
                raise ValueError(f"loader state was saved with {k}={d[k]!r} but this loader has {k}={mine[k]!r}; "
                                 f"exact resume needs the same world size, --num-workers, batch size, seed, "
                                 f"shuffle settings and shard set")
        self.epoch, self.batches = int(d["epoch"]), int(d["batches"])
        if not s.infinite and self.batches >= sum(self._totals()):
            self.epoch, self.batches = self.epoch + 1, 0


def _ignore_signals(signals: tuple[int, ...], worker_id: int) -> None:
    """DataLoader worker init: a SLURM signal sent to the whole process group must reach only the main
    process's handler (which stops cleanly and checkpoints); a worker dying of it would crash the run instead.
    Workers still end with the main process (DataLoader shuts them down; they watch their parent)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()
_EXIT_HOOK = False


def _track_workers(it) -> None:
    """Workers ignore SIGTERM, so multiprocessing's exit hook (terminate = SIGTERM, then join) would wait for
    them forever when the process exits with a loader iterator still alive (a run stopping on a signal). An
    exit hook registered after multiprocessing's (so it runs first) shuts them down the normal way instead,
    and SIGKILLs any that does not stop."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:  # registered lazily: after multiprocessing's own hook, so it runs before it
        atexit.register(_shutdown_live_workers)
        _EXIT_HOOK = True
    _LIVE_ITERATORS.add(it)


def _shutdown_live_workers() -> None:
    for it in list(_LIVE_ITERATORS):
        workers = list(getattr(it, "_workers", []))
        try:
            it._shutdown_workers()
        except Exception:  # noqa: BLE001 - best effort at exit; the kill below is the fallback
            pass
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(5)


def make_loader(stream: ShardStream, num_workers: int = 2, pin_memory: bool | None = None,
                ignore_signals: tuple[int, ...] = WORKER_IGNORED_SIGNALS) -> ShardLoader:
    """The standard way to iterate a ShardStream (see ShardLoader). Workers ignore ``ignore_signals``
    (SIGTERM, SIGINT, SIGUSR1 by default; add the run's requeue signal if it is another one)."""
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory, ignore_signals=ignore_signals)
