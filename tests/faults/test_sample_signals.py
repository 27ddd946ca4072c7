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
ARGS = ["--num-fid-samples", "12", "--num-steps", "100", "--per-proc-batch-size", "2", "--global-seed", "4",
        "--no-progress"]


def _start(args):
    return subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


class _Forked:
    """repa-sample's click command in a forked copy of this process (torch already imported: no 3-5 s start),
    in its own process group like a job step; stdout/stderr go to files. Popen-like: pid, poll, communicate.
    Needs the ``one_thread`` fixture: a fork of a process with a live OpenMP pool can deadlock."""

    def __init__(self, args, log_dir: Path):
        self.out, self.err = log_dir / "stdout", log_dir / "stderr"
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid, self.returncode = os.fork(), None
        if self.pid == 0:  # child
            code = 1
            try:
                os.setpgid(0, 0)
                for fd, path in ((1, self.out), (2, self.err)):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # not pytest's
                from repa.sampler.sample_cli import cli
                cli.main(args=list(args), prog_name="repa-sample")  # standalone: exits via SystemExit
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        try:  # set from both sides, so killpg works however the two processes are scheduled
            os.setpgid(self.pid, self.pid)
        except OSError:
            pass

    def poll(self):
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def communicate(self, timeout=60.0):
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:  # never leave a child behind the test
                os.killpg(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError(f"forked repa-sample did not exit in {timeout} s: {self.err.read_text()}")
            time.sleep(0.02)
        return self.out.read_text(), self.err.read_text()


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
    for k, sig in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)):
        before = len(_pngs(out))
        # the console script once; then forked copies of this process (real processes, cheaper to start)
        proc = _start(run) if k == 0 else _Forked(run, tmp_path)
        _wait_for_pngs(proc, out, before + 1)
        os.killpg(proc.pid, sig)
        t0 = time.time()
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, (sig, stderr[-3000:])
        assert "stopped" in stderr and signal.Signals(sig).name in stderr and "rerun" in stderr, stderr
        assert time.time() - t0 < 10  # the batch in flight is abandoned, not finished
        assert not list(out.glob("*.npz")) and not stdout.strip().endswith(".npz")
        pngs = _pngs(out)
        assert before < len(pngs) < 12
        for p in pngs:  # every PNG under a final name is complete
            Image.open(p).load()
        assert [n for n in os.listdir(pngs[0].parent) if is_temp_name(n)] == []
    npz = sample_main(run)
    assert os.path.basename(npz) == os.path.basename(ref)
    assert Path(npz).read_bytes() == Path(ref).read_bytes()
    faults.record(faults=3, kind="signal", runs=1)


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(ckpt, tmp_path, one_thread, faults):
    out = tmp_path / "run"
    run = ["--ckpt", ckpt, "--sample-dir", str(out), *ARGS, "--num-fid-samples", "200"]  # outlasts the second
    first = _Forked(run, tmp_path)
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
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0 and "stopped by SIGTERM" in err
    faults.record(faults=1, kind="second writer", runs=0)
