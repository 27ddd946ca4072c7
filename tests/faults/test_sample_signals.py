"""repa-sample under real signals and a second writer: real console-script processes, real os.killpg.

SIGTERM / SIGINT (pre-emption, Ctrl-C) and SIGUSR1 (SLURM's requeue warning) sent to the process group mid-run:
the process abandons the batch in flight, keeps only finished PNGs, exits 0 and says how to resume; the rerun's
``.npz`` is byte-identical to an uninterrupted run. A second repa-sample into the same folder is refused, naming
the process that holds it.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from repa.sampler.npz import is_temp_name

EXE = os.path.join(os.path.dirname(sys.executable), "repa-sample")
ARGS = ["--num-fid-samples", "16", "--num-steps", "200", "--per-proc-batch-size", "2", "--global-seed", "4",
        "--no-progress"]


def _start(args):
    return subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _pngs(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.png"))


def _wait_for_pngs(proc, root: Path, n: int, timeout=120.0):
    deadline = time.time() + timeout
    while len(_pngs(root)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no {n} PNGs after {timeout} s"
        time.sleep(0.02)


@pytest.fixture
def ckpt(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_sampler_generate import make_checkpoint
    return make_checkpoint(str(tmp_path / "exps" / "A"))[1]


@pytest.mark.slow
def test_signals_stop_cleanly_and_the_rerun_is_identical(ckpt, tmp_path, one_thread, faults):
    from repa.sampler.sample_cli import main as sample_main
    ref = sample_main(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "ref"), *ARGS])
    out = tmp_path / "run"
    run = ["--ckpt", ckpt, "--sample-dir", str(out), *ARGS]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        before = len(_pngs(out))
        proc = _start(run)
        _wait_for_pngs(proc, out, before + 1)
        os.killpg(proc.pid, sig)
        t0 = time.time()
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, (sig, stderr[-3000:])
        assert "stopped" in stderr and signal.Signals(sig).name in stderr and "rerun" in stderr, stderr
        assert time.time() - t0 < 10  # the batch in flight is abandoned, not finished
        assert not list(out.glob("*.npz")) and not stdout.strip().endswith(".npz")
        pngs = _pngs(out)
        assert before < len(pngs) < 16
        for p in pngs:  # every PNG under a final name is complete
            Image.open(p).load()
        assert [n for n in os.listdir(pngs[0].parent) if is_temp_name(n)] == []
    npz = sample_main(run)
    assert os.path.basename(npz) == os.path.basename(ref)
    assert Path(npz).read_bytes() == Path(ref).read_bytes()
    faults.record(faults=3, kind="signal", runs=1)


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(ckpt, tmp_path, faults):
    out = tmp_path / "run"
    run = ["--ckpt", ckpt, "--sample-dir", str(out), *ARGS, "--num-fid-samples", "200"]  # outlasts the second
    first = _start(run)
    try:
        _wait_for_pngs(first, out, 1)
        second = subprocess.run([EXE, *run], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr
        assert str(first.pid) in second.stderr and "repa-sample" in second.stderr, second.stderr
        assert ".repa-lock" in second.stderr
        assert first.poll() is None  # the holder was not disturbed
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 0
    faults.record(faults=1, kind="second writer", runs=0)
