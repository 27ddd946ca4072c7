"""repa-train refuses bad flags before any work (exit 2, the flag and its allowed range named), resumes knowing what
it resumes (per-flag: applied and logged, or refused naming old and new values), and treats a rerun of the
same command as a resume (a SLURM requeue must not restart at step 0)."""
import hashlib
import json
import os

import pytest
from click.testing import CliRunner

from _train_shards import TINY_MODEL, one_thread, tiny_train_config, write_shards  # noqa: F401 (autouse fixture)
from repa.shards import ShardSetWriter, finalize_manifest, read_manifest
from repa.trainer import train as train_mod
from repa.trainer.checkpoint import list_checkpoints, load_checkpoint
from repa.trainer.cli import main
from repa.trainer.metrics import read_jsonl
from repa.trainer.train import TrainConfig, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("shards") / "set"), n=32)


def _args(shards, out, *extra, name="f"):
    return ["--shards", shards, "--output-dir", str(out), "--exp-name", name, "--model", "SiT-S/2",
            "--model-kwargs", json.dumps(TINY_MODEL), "--encoder-depth", "1", "--batch-size", "8",
            "--mixed-precision", "no", "--num-workers", "0", "--sampling-steps", "0", "--max-train-steps", "2",
            *extra]


def _moved_vae_shards(tmp):
    return write_shards(str(tmp / "vae_shards"), n=16, vae_id=str(tmp / "my-vae-folder-that-moved"))


def _empty_shards(tmp):
    m = read_manifest(write_shards(str(tmp / "proto"), n=16))
    out = str(tmp / "empty")
    with ShardSetWriter(out, m.fields, records_per_shard=16):
        pass
    finalize_manifest(out, m.fields, m.provenance, expected_records=0)
    return out


BAD_FLAGS = [
    (["--checkpointing-steps", "0"], None, ["--checkpointing-steps 0", ">= 1"]),
    (["--gradient-accumulation-steps", "0"], None, ["--gradient-accumulation-steps 0", ">= 1"]),
    (["--ema-decay", "2"], None, ["--ema-decay 2", "[0, 1]"]),
    (["--proj-coeff", "-1"], None, ["--proj-coeff -1", ">= 0"]),
    (["--cfg-prob", "1.5"], None, ["--cfg-prob 1.5", "[0, 1)"]),
    (["--keep-last", "-1"], None, ["--keep-last -1", ">= 0", "0 keeps all"]),
    (["--max-train-steps", "0"], None, ["--max-train-steps 0", ">= 1"]),
    (["--model-kwargs", json.dumps({**TINY_MODEL, "dept": 3})], None, ["--model-kwargs", "'dept'", "hidden_size"]),
    (["--exp-name", "../../x"], None, ["--exp-name ../../x", "plain folder name"]),
    (["--exp-name", "/tmp/abs"], None, ["--exp-name /tmp/abs", "plain folder name"]),
    (["--exp-name", "a/b"], None, ["--exp-name a/b", "plain folder name"]),
    (["--sampling-steps", "1"], _moved_vae_shards, ["my-vae-folder-that-moved", "no longer exists", "--preview-vae",
                                                     "--sampling-steps 0"]),
    ([], _empty_shards, ["0 records", "empty"]),
    (["--shuffle-window", "0"], None, ["--shuffle-window 0", ">= 1"]),
    (["--requeue-signal", "USR9"], None, ["--requeue-signal USR9", "USR1"]),
]


@pytest.mark.parametrize("extra,make_shards,expect", BAD_FLAGS, ids=[" ".join(c[0])[:40] or c[1].__name__
                                                                      for c in BAD_FLAGS])
def test_bad_flag_fails_before_work(shards, tmp_path, extra, make_shards, expect):
    data = make_shards(tmp_path) if make_shards else shards
    out = tmp_path / "o"
    r = CliRunner().invoke(main, _args(data, out, *extra))
    assert r.exit_code == 2, (r.exit_code, r.output)
    for part in expect:
        assert part in r.output, (part, r.output)
    assert "Traceback" not in r.output
    assert not (out / "f" / "metrics.jsonl").exists() and not (out / "f" / "checkpoints").exists()
    assert not (tmp_path / "x").exists() and not os.path.exists("/tmp/abs/checkpoints")


# ---------------------------------------------------------------- resume knows what it resumes

def _sha(ckpt_dir):
    return {n: hashlib.sha256(open(os.path.join(ckpt_dir, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(ckpt_dir))}


def test_resume_applies_and_logs_a_new_learning_rate(shards, tmp_path):
    first = train(tiny_train_config(shards, tmp_path, "lr", max_train_steps=2))
    res = train(tiny_train_config(shards, tmp_path, "lr", max_train_steps=4, learning_rate=5e-5,
                                  checkpointing_steps=1, resume="auto"))
    assert res["step"] == 4
    ck = load_checkpoint(res["checkpoint"])
    assert [g["lr"] for g in ck["train_state"]["optimizer"]["param_groups"]] == [5e-5]
    recs = read_jsonl(os.path.join(tmp_path, "lr", "metrics.jsonl"))
    assert [(r["step"], r["lr"]) for r in recs] == [(1, 1e-4), (2, 1e-4), (3, 5e-5), (4, 5e-5)]
    log = open(os.path.join(tmp_path, "lr", "log.txt")).read()
    assert "--learning-rate 0.0001 -> 5e-05 (applied)" in log
    assert "--checkpointing-steps 2 -> 1 (applied)" in log and "--max-train-steps 2 -> 4 (applied)" in log
    conf = ck["config"]
    assert conf["args"]["learning_rate"] == 5e-5  # config.json says what runs
    assert conf["history"] == [{"step": 2, "resumed_from": first["checkpoint"], "time": conf["history"][0]["time"],
                                "changed": {"checkpointing_steps": [2, 1], "learning_rate": [1e-4, 5e-5],
                                            "max_train_steps": [2, 4]}}]


@pytest.mark.parametrize("flag,change,old,new", [
    ("--model", dict(model="SiT-B/2"), "SiT-S/2", "SiT-B/2"),
    ("--batch-size", dict(batch_size=16), "8", "16"),
    ("--seed", dict(seed=3), "0", "3"),
    ("--proj-coeff", dict(proj_coeff=1.0), "0.5", "1"),
    ("--encoder-depth", dict(encoder_depth=2), "1", "2"),
])
def test_resume_refuses_a_changed_recipe_before_any_work(shards, tmp_path, monkeypatch, flag, change, old, new):
    done = train(tiny_train_config(shards, tmp_path, "m", max_train_steps=2))
    before = _sha(done["checkpoint"])
    built = []
    monkeypatch.setattr(train_mod, "SiT", lambda **kw: built.append(kw))
    with pytest.raises(ValueError) as e:
        train(tiny_train_config(shards, tmp_path, "m", max_train_steps=4, resume="auto", **change))
    msg = str(e.value)
    assert f"{flag} changed from {old} to {new}" in msg and done["checkpoint"] in msg, msg
    assert built == []  # refused before the model was even built
    assert _sha(done["checkpoint"]) == before
    assert [r["step"] for r in read_jsonl(os.path.join(tmp_path, "m", "metrics.jsonl"))] == [1, 2]


def test_resume_refuses_another_shard_set(shards, tmp_path):
    train(tiny_train_config(shards, tmp_path, "d", max_train_steps=2))
    other = write_shards(str(tmp_path / "other"), n=32, seed=5)
    with pytest.raises(ValueError, match=r"--shards .*different shard set"):
        train(tiny_train_config(other, tmp_path, "d", max_train_steps=4, resume="auto"))


def test_every_flag_has_a_resume_rule():
    from repa.trainer.resume import APPLIED_ON_RESUME, FIXED_ON_RESUME
    fields = {f.name for f in __import__("dataclasses").fields(TrainConfig)}
    assert APPLIED_ON_RESUME | FIXED_ON_RESUME == fields and not APPLIED_ON_RESUME & FIXED_ON_RESUME
    assert {"learning_rate", "max_train_steps", "checkpointing_steps", "num_workers", "sampling_steps"} <= APPLIED_ON_RESUME
    assert {"model", "model_kwargs", "batch_size", "seed", "proj_coeff", "encoder_depth", "shuffle_window"} <= FIXED_ON_RESUME


# ---------------------------------------------------------------- a rerun is not a restart

def test_rerun_without_resume_continues(shards, tmp_path):
    r = CliRunner().invoke(main, _args(shards, tmp_path, "--checkpointing-steps", "2", name="re"))
    assert r.exit_code == 0, r.output
    root = tmp_path / "re" / "checkpoints"
    first = _sha(root / "0000002")
    ino = os.stat(root / "0000002" / "model.safetensors").st_ino
    r = CliRunner().invoke(main, _args(shards, tmp_path, "--checkpointing-steps", "2", name="re")[:-2]
                           + ["--max-train-steps", "4"])  # the same command, longer (no --resume)
    assert r.exit_code == 0, r.output
    log = open(tmp_path / "re" / "log.txt").read()
    assert f"resuming from {root / '0000002'} (step 2)" in log
    assert [os.path.basename(c) for c in list_checkpoints(str(root))] == ["0000002", "0000004"]
    assert _sha(root / "0000002") == first and os.stat(root / "0000002" / "model.safetensors").st_ino == ino
    assert [m["step"] for m in read_jsonl(str(tmp_path / "re" / "metrics.jsonl"))] == [1, 2, 3, 4]


def test_explicit_older_checkpoint_would_overwrite_newer_refused(shards, tmp_path):
    train(tiny_train_config(shards, tmp_path, "old", max_train_steps=4))  # checkpoints 2, 4
    root = tmp_path / "old" / "checkpoints"
    with pytest.raises(ValueError, match=r"newer checkpoints .*0000004.*--exp-name"):
        train(tiny_train_config(shards, tmp_path, "old", max_train_steps=4, resume=str(root / "0000002")))
    # into a new experiment it is fine
    out = train(tiny_train_config(shards, tmp_path, "branch", max_train_steps=3, resume=str(root / "0000002")))
    assert out["step"] == 3
