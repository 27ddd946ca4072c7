"""One writer per repa-preprocess `--out` (issue #11 item 1): two real processes released at the same instant
(one refused with the holder's details, never a mixed set), a SIGKILLed holder's lock taken over with a
warning, and the same on an object store (moto on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from faults.test_preprocess_resume import cli, killed_after_shards, make_folder, pp_args, tar_records

REPO = Path(__file__).resolve().parents[2]
# imports everything, says it is ready, waits for the go file, then runs the real console script's main()
LAUNCH = """import os, sys, time
from repa.preprocess.cli import main
open(sys.argv[1] + '.ready-' + str(os.getpid()), 'w').close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
sys.argv = ['repa-preprocess'] + sys.argv[2:]
main()
"""


def test_two_writers_released_together(tmp_path, faults):
    data, out = tmp_path / "data", tmp_path / "out"
    make_folder(data, 600)
    go = tmp_path / "go"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    runs = {seed: subprocess.Popen([sys.executable, "-c", LAUNCH, str(go), *pp_args(data, out, "--seed", seed)],
                                   env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for seed in ("1", "2")}
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2:
        assert time.time() < deadline and all(p.poll() is None for p in runs.values())
        time.sleep(0.01)
    go.touch()
    res = {seed: (p.wait(120), *p.communicate()) for seed, p in runs.items()}
    ok = [s for s, (rc, _, _) in res.items() if rc == 0]
    refused = [s for s, (rc, _, _) in res.items() if rc != 0]
    assert len(ok) == 1 and len(refused) == 1, res
    err = res[refused[0]][2]
    assert "locked by another run" in err and "repa-preprocess" in err and str(runs[ok[0]].pid) in err, err
    assert "--seed " + ok[0] in err  # the holder's command line
    # the set is exactly the winner's: same settings, the same records as a run of its command alone
    assert json.loads((out / "preprocess.json").read_text())["settings"]["seed"] == int(ok[0])
    ref = tmp_path / "ref"
    cli(pp_args(data, ref, "--seed", ok[0]))
    assert tar_records(out) == tar_records(ref)
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((ref / "manifest.json").read_text())["shards"]
    faults.record(faults=1, kind="two writers", runs=1)


def test_stale_lock_of_killed_run_taken_over(tmp_path, capsys, faults):
    data, out = tmp_path / "data", tmp_path / "out"
    make_folder(data, 30)
    args = pp_args(data, out, shard_size=10, batch=5)
    killed_after_shards(args, 1)
    held = json.loads((out / ".repa-lock").read_text())
    assert held["stage"] == "repa-preprocess"
    s = cli(args)
    err = capsys.readouterr().err
    assert "took over the output lock" in err and f"pid {held['pid']}" in err, err
    assert s["records"] == 30 and s["records_written"] == 20
    assert sorted(tar_records(out)) == list(range(30))
    faults.record(faults=1, kind="SIGKILL", runs=1)


def test_s3_lock_refuses_a_second_writer(s3_bucket, tmp_path, faults):
    from repa.shards.lock import OutputLock
    data = tmp_path / "data"
    make_folder(data, 12)
    url = f"{s3_bucket}/set"
    args = pp_args(data, url, shard_size=5, batch=5)
    other = OutputLock(url, stage="repa-preprocess").acquire()  # another host's run, alive
    try:
        with pytest.raises(click.ClickException) as e:
            cli(args)
        assert "locked by another run" in e.value.message and f"pid {os.getpid()}" in e.value.message
    finally:
        other.release()
    from repa.shards import storage
    assert [n for n in storage.listdir(url) if n != ".repa-lock"] == []  # refused before any write
    s = cli(args)
    assert s["records"] == 12 and ".repa-lock" not in storage.listdir(url)  # released at the end
    faults.record(faults=1, kind="two writers", runs=1)
