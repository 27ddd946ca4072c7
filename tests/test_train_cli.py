"""repa-train CLI (in-process through click's runner): shard-set discovery in a parent dir, the first log
line, SIGTERM -> checkpoint at the end of the current step and exit 0, EMA preview grid, flag errors."""
import json
import os
import signal
import threading
import time

from click.testing import CliRunner

from _train_shards import TINY_MODEL, one_thread, write_shards  # noqa: F401 (autouse fixture)
from repa.trainer.checkpoint import list_checkpoints
from repa.trainer.cli import main
from repa.trainer.metrics import read_jsonl


def _args(shards, out, *extra):
    return ["--shards", shards, "--output-dir", out, "--exp-name", "cli", "--model", "SiT-S/2",
            "--model-kwargs", json.dumps(TINY_MODEL), "--encoder-depth", "1", "--batch-size", "8",
            "--mixed-precision", "no", "--num-workers", "0", "--sampling-steps", "3", "--num-preview", "4",
            "--preview-steps", "4", *extra]


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    write_shards(str(tmp_path / "shards" / "imagenet-64"), n=48)      # parent dir with one shard set
    out = str(tmp_path / "exps")
    metrics = os.path.join(out, "cli", "metrics.jsonl")

    def send_sigterm_after_3_steps():
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(metrics) and len(read_jsonl(metrics)) >= 3):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the loop finishes the step

    before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=send_sigterm_after_3_steps)
    killer.start()
    result = CliRunner().invoke(main, _args(str(tmp_path / "shards"), out, "--max-train-steps", "100000",
                                            "--checkpointing-steps", "100000"))
    killer.join()
    assert result.exit_code == 0, result.output
    last = read_jsonl(metrics)[-1]["step"]
    assert 3 <= last < 100
    ckpts = list_checkpoints(os.path.join(out, "cli", "checkpoints"))
    assert [os.path.basename(c) for c in ckpts] == [f"{last:07d}"]
    log = open(os.path.join(out, "cli", "log.txt")).read()
    assert "processes=1 device=cpu mixed_precision=no" in log.splitlines()[0]
    assert "imagenet-64" in log and "stop signal" in log
    assert os.path.isfile(os.path.join(out, "cli", "samples", "0000003.png"))  # EMA preview grid
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored after the run


def test_cli_errors_name_the_flag(tmp_path):
    shards = write_shards(str(tmp_path / "s"), n=16)
    r = CliRunner().invoke(main, _args(shards, str(tmp_path / "o"), "--batch-size", "6",
                                       "--gradient-accumulation-steps", "4"))
    assert r.exit_code == 2 and "--batch-size 6" in r.output and r.exc_info[0] is SystemExit
    r = CliRunner().invoke(main, _args(shards, str(tmp_path / "o"), "--model-kwargs", "{depth: 2}"))
    assert r.exit_code == 2 and "--model-kwargs" in r.output
    r = CliRunner().invoke(main, _args(shards, str(tmp_path / "o"), "--resume", str(tmp_path / "nope")))
    assert r.exit_code == 2 and "--resume" in r.output


def _train_3_steps(tmp_path, *extra):
    """Three steps of the tiny model through the CLI; returns the run's output dir."""
    shards = write_shards(str(tmp_path / "s"), n=16)
    out = str(tmp_path / "o")
    r = CliRunner().invoke(main, _args(shards, out, "--max-train-steps", "3", "--checkpointing-steps", "100", *extra))
    assert r.exit_code == 0, r.output
    return out


def test_report_to_tensorboard_logs_the_losses(tmp_path):
    """--report-to tensorboard goes through accelerate's tracker and records the per-step metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _train_3_steps(tmp_path, "--sampling-steps", "100", "--report-to", "tensorboard")
    events = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(out, "cli")) for f in fs
              if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    jsonl = read_jsonl(os.path.join(out, "cli", "metrics.jsonl"))
    logged = acc.Scalars("loss")
    assert [e.step for e in logged] == [m["step"] for m in jsonl] == [1, 2, 3]
    assert [round(e.value, 5) for e in logged] == [round(m["loss"], 5) for m in jsonl]


def test_cfg_prob_zero_trains_and_previews_without_guidance(tmp_path):
    """--cfg-prob 0: no null class, so the EMA preview samples unguided instead of crashing the run."""
    out = _train_3_steps(tmp_path, "--sampling-steps", "3", "--cfg-prob", "0")
    assert os.path.isfile(os.path.join(out, "cli", "samples", "0000003.png"))


def test_cli_conventions(tmp_path):
    """-h shows defaults, --version, --data-dir alias of --shards, --resume-step, --no-progress."""
    r = CliRunner().invoke(main, ["-h"])
    assert r.exit_code == 0 and "[default: 0.0001]" in r.output and "--data-dir" in r.output
    assert "--requeue-signal" in r.output and "--skip-bad" in r.output and "--no-progress" in r.output
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "repa-train, version" in r.output
    shards = write_shards(str(tmp_path / "s"), n=16)
    out = str(tmp_path / "o")
    args = _args(shards, out, "--max-train-steps", "2", "--checkpointing-steps", "1", "--no-progress")
    args[args.index("--shards")] = "--data-dir"
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "train:" not in r.output  # no progress bar
    r = CliRunner().invoke(main, args[:-5] + ["--max-train-steps", "3", "--resume-step", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    log = open(os.path.join(out, "cli", "log.txt")).read()
    assert f"resuming from {os.path.join(out, 'cli', 'checkpoints', '0000002')} (step 2)" in log


def test_official_train_flags_are_accepted_and_checked(tmp_path):
    """The official train.py command pastes with one edit: --enc-type/--resolution/--num-classes are checked
    against the shard set, --epochs stops the run as the official loop does, --legacy is refused."""
    shards = write_shards(str(tmp_path / "s"), n=48)       # 48 records, 10 classes, 64 px, teacher test-teacher-0
    official = ["--enc-type=test-teacher-0", "--resolution=64", "--num-classes=10", "--path-type=linear",
                "--prediction=v", "--weighting=uniform", "--proj-coeff=0.5", "--seed=0", "--report-to=none"]
    r = CliRunner().invoke(main, _args(shards, str(tmp_path / "o"), *official, "--epochs=1",
                                       "--checkpointing-steps", "100"))
    assert r.exit_code == 0, r.output
    steps = [m["step"] for m in read_jsonl(str(tmp_path / "o" / "cli" / "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]                      # one epoch = 48 // 8 steps
    for bad, needle in ((["--enc-type=dinov2-vit-b"], "--enc-type dinov2-vit-b"), (["--resolution=256"],
                        "--resolution 256"), (["--num-classes=1000"], "--num-classes 1000"), (["--legacy"],
                        "--legacy")):
        r = CliRunner().invoke(main, _args(shards, str(tmp_path / "bad"), *bad))
        assert r.exit_code == 2 and needle in r.output, r.output
    assert not os.path.exists(tmp_path / "bad")             # refused before any work
