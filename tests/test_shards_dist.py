"""repa.shards.dist: the launcher environment, checked; collectives across two real (forked) gloo ranks."""
import os
import socket

import pytest

from repa.shards import dist


def test_from_env_defaults_and_checks(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = dist.context()
    assert ctx == dist.DistContext(0, 1, 0) and ctx.is_main and not ctx.grouped
    assert ctx.all_ok(False) is False and ctx.broadcast({"a": 1}) == {"a": 1}
    ctx.barrier()  # no process group: a no-op
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.from_env() == dist.DistContext(3, 4, 1) and not dist.from_env().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4, WORLD_SIZE=4.*0 <= RANK < WORLD_SIZE"):
        dist.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not an integer"):
        dist.from_env()


def _rank_main(rank, port, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx = dist.init(backend="gloo", timeout_s=60)
    ctx.barrier()
    q.put((rank, ctx.rank, ctx.world_size, ctx.grouped, ctx.all_ok(rank == 0), ctx.all_ok(True),
           ctx.broadcast(f"from {rank}")))
    import torch.distributed as td
    td.destroy_process_group()


def test_two_ranks_agree():
    import multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert got == [(0, 0, 2, True, False, True, "from 0"), (1, 1, 2, True, False, True, "from 0")]
