"""Disk full (ENOSPC, simulated in-process) while writing a checkpoint or a shard: the previous checkpoint/shards
stay intact, nothing half-written is published, and the error says so."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from faults.test_kill import train_cfg
from repa.shards import ShardSetWriter, completed_shards
from test_shards_rw import FIELDS, sample_for


def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_disk_full_keeps_previous(tmp_path, monkeypatch, faults):
    from _train_shards import write_shards
    from repa.trainer import checkpoint as ck
    from repa.trainer.train import train
    shards = write_shards(str(tmp_path / "s"), n=16)
    cfg = train_cfg(shards, tmp_path, "run", max_train_steps=2, checkpointing_steps=1)
    train(cfg)  # checkpoints 1, 2
    root = tmp_path / "run" / "checkpoints"
    before = {p: p.read_bytes() for p in (root / "0000002").iterdir()}
    real = ck.save_file
    calls = [0]

    def full_disk(sd, path, *a, **k):  # the disk fills up while ema.safetensors of step 3 is written
        calls[0] += 1
        if calls[0] == 2:
            Path(path).write_bytes(b"\0" * 100)
            enospc()
        return real(sd, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(OSError) as e:
        train(train_cfg(shards, tmp_path, "run", max_train_steps=3, checkpointing_steps=1))
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "0000003" in msg and "0000002" in msg and "intact" in msg, msg
    assert sorted(os.listdir(root)) == ["0000001", "0000002"]  # no temp dir, no half checkpoint
    assert {p: p.read_bytes() for p in (root / "0000002").iterdir()} == before
    monkeypatch.setattr(ck, "save_file", real)
    assert train(train_cfg(shards, tmp_path, "run", max_train_steps=3, checkpointing_steps=1))["step"] == 3
    faults.record(faults=1, kind="ENOSPC checkpoint", runs=1)


def test_shard_disk_full_keeps_previous(tmp_path, monkeypatch, faults):
    import repa.shards.writer as sw
    out = tmp_path / "set"

    class Full:
        """A shard temp file on a disk with room for 3 records."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            if self.n + len(b) > 3 * 5120:
                enospc()
            self.n += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    with ShardSetWriter(str(out), FIELDS, records_per_shard=4) as w:
        for k in range(8):
            w.write(k, sample_for(k))  # shards 0 and 1 complete
    good = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in os.listdir(out)}
    real_create = sw.storage.create_temp  # every shard temp file is opened by storage.create_temp
    monkeypatch.setattr(sw.storage, "create_temp", lambda d, n: (lambda f, p: (Full(f), p))(*real_create(d, n)))
    with pytest.raises(OSError) as e:
        with ShardSetWriter(str(out), FIELDS, records_per_shard=4) as w:
            for k in range(12):
                w.write(k, sample_for(k))
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "shard-000002.tar" in msg and "intact" in msg, msg
    assert {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in os.listdir(out)} == good
    assert sorted(completed_shards(str(out))) == ["shard-000000.tar", "shard-000001.tar"]
    faults.record(faults=1, kind="ENOSPC shard", runs=0)
