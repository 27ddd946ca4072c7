"""bench/gpu.py --quick: the whole device check on CPU with tiny shapes, as real subprocesses.

The GPU run (make gpu-check) executes the same code with real shapes; these tests show that every section runs,
that the correctness checks are real assertions (a failing one gives exit 1), and that a hung section is killed at
its budget without losing what it or the other sections measured.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu.py")
HEADLINE = ("xl2_img_s", "xl2_vs_reference", "b2_vs_reference", "compile_speedup", "peak_mem_gib",
            "haste_phase1_vs_repa", "haste_after_stop_vs_repa", "preprocess_img_s", "preprocess_of_model_only",
            "sample_img_s_b2", "sample_vs_reference_b2", "sample_img_s_b4", "sample_vs_reference_b4",
            "sample_fused_attn_speedup")
CHECKS = ("loss_fp32_device_vs_cpu_rel", "loss_bf16_vs_fp32_rel", "proj_bf16_vs_fp32_abs", "loss_fp16_vs_fp32_rel",
          "proj_fp16_vs_fp32_abs", "sampler_device_vs_cpu_abs", "train_20_steps_loss_decreases",
          "checkpoint_round_trip_bitwise")


def run_quick(*extra: str, timeout: float = 400) -> tuple[int, dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", *extra], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(lines[-1]), proc.stdout + proc.stderr


@pytest.mark.slow
def test_quick_runs_every_section_and_every_check_passes():
    rc, out, log = run_quick()
    assert rc == 0, log[-4000:]
    assert out["quick"] is True and out["device"].startswith("cpu")
    assert {k: v["status"] for k, v in out["sections"].items()} == {
        s: "ok" for s in ("correctness", "train_xl2", "train_b2", "haste", "sampling", "preprocess", "compile")}
    assert out["errors"] == {}
    for key in HEADLINE:
        assert isinstance(out[key], (int, float)) and math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    assert out["correctness_passed"] is True
    assert set(out["checks"]) == set(CHECKS)
    assert all(c["ok"] for c in out["checks"].values()), out["checks"]
    raw = out["raw"]
    # values, not just presence: the CPU-vs-"device" comparisons run on the same CPU here, so they are exact
    assert out["checks"]["loss_fp32_device_vs_cpu_rel"]["value"] == 0.0
    assert out["checks"]["sampler_device_vs_cpu_abs"]["value"] == 0.0
    assert out["checks"]["checkpoint_round_trip_bitwise"]["value"] == 0
    assert out["checks"]["checkpoint_round_trip_bitwise"]["tol"].endswith("tensors differ")
    losses = raw["check_train_losses"]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert 0 < out["checks"]["loss_bf16_vs_fp32_rel"]["value"] < 3e-2  # bf16 really ran (not the fp32 path)
    assert raw["sample_steps_nominal"] == 250 and raw["compile_backend"] == "eager"
    assert raw["haste_student_blocks"] == [0, 1] and raw["haste_teacher_blocks"] == [4, 5]
    assert out["wall_s"] < 240


@pytest.mark.slow
def test_a_hung_section_is_killed_at_its_budget_and_a_failing_check_fails_the_run():
    """One run, two faults: haste hangs after its first measurement (a real hang, killed with SIGKILL at its
    budget), and every numeric tolerance is scaled to 0 so the checks that see any difference must fail."""
    t = time.monotonic()
    # spawn: the start method the GPU run uses (fresh interpreters), so that path runs here too
    rc, out, log = run_quick("--only", "haste,correctness", "--hang", "haste", "--section-budget", "haste=20",
                             "--start-method", "spawn", "--tol-scale", "0")
    assert time.monotonic() - t < 180
    assert out["sections"]["haste"]["status"] == "timeout"
    assert "killed at its 20 s budget" in out["sections"]["haste"]["error"]
    assert out["sections"]["haste"]["seconds"] < 35
    assert out["raw"]["haste_student_blocks"] == [0, 1]  # what the section sent before it hung survives
    assert out["haste_phase1_vs_repa"] is None and out["xl2_img_s"] is None  # not measured: null, not made up
    # the correctness section still ran after the hung one, and its assertions are real: exit status 1
    assert out["sections"]["correctness"]["status"] == "ok", log[-3000:]
    assert set(out["checks"]) == set(CHECKS)
    assert rc == 1 and out["correctness_passed"] is False
    failed = {k for k, c in out["checks"].items() if not c["ok"]}
    assert {"loss_bf16_vs_fp32_rel", "loss_fp16_vs_fp32_rel"} <= failed  # nonzero differences, tolerance 0
    assert out["checks"]["checkpoint_round_trip_bitwise"]["ok"] is True  # exact checks do not scale
    assert out["checks"]["train_20_steps_loss_decreases"]["ok"] is True
