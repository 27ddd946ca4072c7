"""ShardStream / ShardLoader: exactly-once coverage, shuffling, exact resume, corruption handling."""
import os

import pytest
import torch

from repa.shards import FieldSpec, ShardError, ShardStream, make_loader
from repa.shards.reader import _delivered, slot_range
from test_shards_rw import FIELDS, expected_batch, write_set

N, RPS = 103, 15  # 7 shards (6 x 15 + 13): N divisible neither by the shard count nor by 2 ranks x 2 workers


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("set")
    m = write_set(out, N, RPS)
    assert len(m.shards) == 7
    return str(out)


def epoch_keys(loader):
    return [b["key"].tolist() for b in loader]


def flat(batches):
    return [k for b in batches for k in b]


def test_slot_ranges_partition():
    for n in (0, 1, 5, 103):
        for s_count in (1, 3, 4, 7):
            ranges = [slot_range(s, s_count, n) for s in range(s_count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_exactly_once_two_ranks_two_workers(shard_set):
    seen = []
    for rank in range(2):
        stream = ShardStream(shard_set, 4, rank=rank, world_size=2, seed=3, shuffle_window=8)
        loader = make_loader(stream, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:  # content travels with its key
            assert torch.equal(b["label"], b["key"] % 7)
            assert torch.equal(b["moments"], expected_batch(b["key"].tolist())["moments"])
        seen += flat([b["key"].tolist() for b in batches])
    assert sorted(seen) == list(range(N))  # no duplicates, no gaps
    assert seen != sorted(seen)  # and shuffled


def test_shuffle_deterministic_and_differs_across_epochs(shard_set):
    loader = make_loader(ShardStream(shard_set, 8, seed=5, shuffle_window=16), num_workers=0)
    e0, e1 = epoch_keys(loader), epoch_keys(loader)
    assert loader.epoch == 2
    assert sorted(flat(e0)) == sorted(flat(e1)) == list(range(N))
    assert flat(e0) != flat(e1)
    again = make_loader(ShardStream(shard_set, 8, seed=5, shuffle_window=16), num_workers=0)
    assert epoch_keys(again) == e0
    other = make_loader(ShardStream(shard_set, 8, seed=6, shuffle_window=16), num_workers=0)
    assert flat(epoch_keys(other)) != flat(e0)
    plain = ShardStream(shard_set, 8, shuffle=False)
    assert flat([b["key"].tolist() for b in plain]) == list(range(N))


def test_delivery_model():
    # DataLoader in-order round robin, exhausted workers skipped
    assert _delivered(5, [None, None]) == ([3, 2], 1)
    assert _delivered(6, [None, None, None]) == ([2, 2, 2], 0)
    assert _delivered(5, [3, 2]) == ([3, 2], 0)
    assert _delivered(4, [3, 1, 3]) == ([2, 1, 1], 1)  # worker 1 is exhausted: skipped, 2 delivers next
    assert _delivered(6, [3, 1, 3]) == ([3, 1, 2], 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_finite_equals_uninterrupted(shard_set, workers):
    def make():
        return make_loader(ShardStream(shard_set, 4, seed=1, shuffle_window=8, rank=1, world_size=2),
                           num_workers=workers)

    ref = make()
    full = epoch_keys(ref) + epoch_keys(ref)  # two epochs
    per_epoch = len(full) // 2
    cuts = [7, per_epoch - 1] if workers else [5]
    for k in cuts:
        a = make()
        got = []
        for i, b in enumerate(a):  # consume k batches of epoch 0, then "crash"
            got.append(b["key"].tolist())
            if i + 1 == k:
                break
        state = a.state_dict()
        assert state["batches"] == k
        b2 = make()
        b2.load_state_dict(state)
        got += epoch_keys(b2)
        got += epoch_keys(b2)  # next epoch continues normally
        assert got == full, k


def test_resume_infinite_with_workers(shard_set):
    def make(workers=2):
        return make_loader(ShardStream(shard_set, 5, seed=2, shuffle_window=8, infinite=True), num_workers=workers)

    def take(loader, n):
        out = []
        for b in loader:
            out.append(b["key"].tolist())
            if len(out) == n:
                return out

    total = 50  # > 2 epochs of 103 records: batches straddle epochs
    ref = take(make(), total)
    assert sorted(flat(ref)[:100]) != flat(ref)[:100]
    a = make()
    head = take(a, 23)
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    assert head + take(b, total - 23) == ref
    with pytest.raises(ValueError, match="num_workers"):
        make(workers=1).load_state_dict(state)


def corrupt_copy(src, dst, fn):
    import shutil
    shutil.copytree(src, dst)
    fn(os.path.join(dst, "shard-000002.tar"))
    return str(dst)


def test_crc_error_names_shard_and_record(shard_set, tmp_path):
    rb = ShardStream(shard_set, 1).manifest.record_bytes

    def flip(p):  # one byte inside record 4's moments data (after its 512-byte header)
        with open(p, "r+b") as f:
            f.seek(4 * rb + 512 + 10)
            c = f.read(1)
            f.seek(4 * rb + 512 + 10)
            f.write(bytes([c[0] ^ 0x40]))

    bad = corrupt_copy(shard_set, tmp_path / "bad", flip)
    with pytest.raises(ShardError, match=r"shard-000002\.tar: record 4 \(key 34\): CRC-32 mismatch"):
        list(ShardStream(bad, 8, shuffle=False))
    s = ShardStream(bad, 8, shuffle=False, skip_bad=True)
    keys = flat([b["key"].tolist() for b in s])
    assert keys == [k for k in range(N) if k != 34] and s.skipped == 1
    loader = make_loader(ShardStream(bad, 8, skip_bad=True), num_workers=2)
    assert sorted(flat(epoch_keys(loader))) == [k for k in range(N) if k != 34] and loader.skipped == 1
    # verify=False skips the CRC (headers are still checked)
    assert len(flat([b["key"].tolist() for b in ShardStream(bad, 8, verify=False)])) == N


def test_header_corruption_and_truncation(shard_set, tmp_path):
    rb = ShardStream(shard_set, 1).manifest.record_bytes

    def clobber_name(p):  # record 2's second member header: name byte
        with open(p, "r+b") as f:
            f.seek(2 * rb + 1024 + 11)
            f.write(b"X")

    bad = corrupt_copy(shard_set, tmp_path / "hdr", clobber_name)
    with pytest.raises(ShardError, match=r"shard-000002\.tar: record 2 \(key 32\): tar header of member 1 \('label'"):
        list(ShardStream(bad, 8, shuffle=False))

    def truncate(p):
        os.truncate(p, 10 * rb + 100)

    short = corrupt_copy(shard_set, tmp_path / "short", truncate)
    with pytest.raises(ShardError, match=r"shard-000002\.tar: .* bytes, but the manifest says .*truncated"):
        list(ShardStream(short, 8, shuffle=False))
    s = ShardStream(short, 8, shuffle=False, skip_bad=True)
    keys = flat([b["key"].tolist() for b in s])
    assert keys == [k for k in range(N) if not 40 <= k < 45] and s.skipped == 5


TINY = {"label": FieldSpec((), "int64")}  # 2 KiB records


def test_skip_bad_window_inside_a_missing_shard(tmp_path):
    """Production-like plan: 1000-record shards, 512-record windows; a window lying wholly inside a missing
    shard used to hit the memory-map path of the stand-in file (AttributeError)."""
    write_set(tmp_path, 3000, 1000, fields=TINY)
    (tmp_path / "shard-000001.tar").unlink()
    for shuffle in (False, True):
        s = ShardStream(str(tmp_path), 256, shuffle=shuffle, seed=3, shuffle_window=512, skip_bad=True)
        keys = [int(k) for b in s for k in b["key"]]
        assert len(keys) == 2000 and sorted(keys) == [*range(1000), *range(2000, 3000)]
        assert s.skipped == 1000
    with pytest.raises(ShardError, match=r"shard-000001\.tar: listed in the manifest \(1000 records\) but missing"):
        list(ShardStream(str(tmp_path), 256, shuffle=False, shuffle_window=512))
