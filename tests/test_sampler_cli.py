"""repa-sample's command line: click conventions, reference flag spellings, bad flags refused before any work."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_sampler_generate import make_checkpoint

from repa.sampler.sample_cli import cli, main as sample_main

ARGS = ["--num-fid-samples", "4", "--num-steps", "2", "--per-proc-batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("exps") / "A"))[1]


@pytest.fixture(scope="module")
def ckpt_nocfg(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("exps") / "nocfg"), cfg_prob=0.0)[1]


def _refused(argv, tmp_path, *needles):
    """Runs the click command in-process: exit status != 0, message names every needle, nothing written."""
    res = CliRunner().invoke(cli, [*argv, "--sample-dir", str(tmp_path / "out")])
    assert res.exit_code != 0, res.output
    text = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    for n in needles:
        assert n in text, (n, text)
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()  # refused before any work
    return text


def test_help_version_defaults_and_no_abbreviations(ckpt, tmp_path):
    r = CliRunner()
    for flag in ("-h", "--help"):
        res = r.invoke(cli, [flag])
        assert res.exit_code == 0 and "--cfg-scale" in res.output and "--no-progress" in res.output
    assert "default: 1.5" in " ".join(res.output.split())  # defaults are shown
    from importlib.metadata import version
    res = r.invoke(cli, ["--version"])
    assert res.exit_code == 0 and version("repa") in res.output
    res = r.invoke(cli, ["--ckpt", ckpt, "--cfg", "2", *ARGS])  # argparse took this as --cfg-scale 2
    assert res.exit_code == 2 and "--cfg" in res.output and "No such option" in res.output


def test_reference_flag_spellings_are_aliases(ckpt, tmp_path):
    # docs/reference.md §9.2: the reference generate.py spells these two with underscores, and has --no-heun
    a = sample_main(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "a"), *ARGS, "--guidance-high", "0.5",
                     "--guidance-low", "0.1"])
    b = sample_main(["--ckpt", ckpt, "--sample-dir", str(tmp_path / "b"), *ARGS, "--guidance_high", "0.5",
                     "--guidance_low=0.1", "--no-heun", "--no-legacy", "--projector-embed-dims", "8",
                     "--no-qk-norm"])
    assert os.path.basename(a) == os.path.basename(b) and open(a, "rb").read() == open(b, "rb").read()
    _refused(["--ckpt", ckpt, *ARGS, "--projector-embed-dims", "768,1024"], tmp_path, "--projector-embed-dims",
             "[8]")


def test_bad_flags_fail_before_work(ckpt, tmp_path):
    _refused(["--ckpt", ckpt, *ARGS, "--guidance-low", "0.8", "--guidance-high", "0.3"], tmp_path,
             "--guidance-low", "--guidance-high")
    _refused(["--ckpt", ckpt, *ARGS, "--vae", "/nope"], tmp_path, "--vae", "/nope")
    for n in ("0", "-3"):
        _refused(["--ckpt", ckpt, *ARGS, "--num-fid-samples", n], tmp_path, "--num-fid-samples")
    _refused(["--ckpt", ckpt, *ARGS, "--per-proc-batch-size", "0"], tmp_path, "--per-proc-batch-size")
    _refused(["--ckpt", str(tmp_path / "missing"), *ARGS], tmp_path, "--ckpt", "missing")


def test_moved_training_vae_folder_is_named(tmp_path):
    _, ck = make_checkpoint(str(tmp_path / "exps" / "latent"))
    cfg_path = os.path.join(ck, "0000007", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["data"]["vae"]["id"] = str(tmp_path / "vaes" / "my-vae")  # a local VAE folder that has since moved
    json.dump(cfg, open(cfg_path, "w"))
    text = _refused(["--ckpt", ck, *ARGS], tmp_path, str(tmp_path / "vaes" / "my-vae"), "--vae")
    assert "config.json" in text
    open(os.path.join(ck, "0000007", "ema.safetensors"), "wb").write(b"garbage")  # said before loading weights
    _refused(["--ckpt", ck, *ARGS], tmp_path, str(tmp_path / "vaes" / "my-vae"), "--vae")


def test_cfg_at_the_default_scale_on_a_model_without_null_class(ckpt_nocfg, tmp_path):
    text = _refused(["--ckpt", ckpt_nocfg, *ARGS], tmp_path, "--cfg-scale", "--cfg-scale 1", "--cfg-prob 0")
    assert "default" in text
    _refused(["--ckpt", ckpt_nocfg, *ARGS, "--cfg-scale", "2"], tmp_path, "--cfg-scale 2", "--cfg-scale 1")
    npz = sample_main(["--ckpt", ckpt_nocfg, "--sample-dir", str(tmp_path / "ok"), *ARGS, "--cfg-scale", "1"])
    assert npz.endswith(".npz") and "-cfg-1.0-" in npz


def test_console_script_exit_status_and_stdout(ckpt, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "repa-sample")
    res = subprocess.run([exe, "--ckpt", ckpt, "--sample-dir", str(tmp_path), *ARGS], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].endswith(".npz")
