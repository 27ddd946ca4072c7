"""repa-sample knows what it resumes: sample folders are keyed by the checkpoint's identity (experiment, step,
hash of the weights loaded), folders that are not ours are refused, and cleanup touches only our temp files."""
import json
import os
import shutil

import pytest
from test_sampler_generate import make_checkpoint

from repa.sampler.load import load_sampling_model, state_dict_sha256
from repa.sampler.npz import is_temp_name, temp_path
from repa.sampler.sample_cli import main as sample_main

ARGS = ["--num-fid-samples", "8", "--num-steps", "2", "--per-proc-batch-size", "4", "--global-seed", "5",
        "--no-progress"]


def _pngs(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".png")}


def test_retrained_checkpoint_at_the_same_path_never_reuses_old_pngs(tmp_path):
    exp = str(tmp_path / "exps" / "A")
    _, ck = make_checkpoint(exp, seed=0)
    old = sample_main(["--ckpt", ck, "--sample-dir", str(tmp_path / "s"), *ARGS])
    _, ck = make_checkpoint(exp, seed=1)  # retrained: same experiment, same step, same path, new weights
    os.remove(old)  # the old run "was interrupted before its npz" (its PNGs are all there)
    new = sample_main(["--ckpt", ck, "--sample-dir", str(tmp_path / "s"), *ARGS])
    assert new != old
    fresh_exp = str(tmp_path / "fresh" / "A")  # the same new weights sampled into an empty folder
    _, fresh_ck = make_checkpoint(fresh_exp, seed=1)
    fresh = sample_main(["--ckpt", fresh_ck, "--sample-dir", str(tmp_path / "f"), *ARGS])
    assert os.path.basename(fresh) == os.path.basename(new)  # the name depends on the weights, not the path
    assert _pngs(new[:-4]) == _pngs(fresh[:-4]) and len(_pngs(new[:-4])) == 8
    assert open(new, "rb").read() == open(fresh, "rb").read()
    assert _pngs(old[:-4]) != _pngs(new[:-4])
    rec = json.load(open(new[:-4] + ".json"))
    _, cfg = load_sampling_model(ck)
    assert rec["checkpoint"]["weights_sha256"] == cfg["source"]["weights_sha256"]
    assert rec["checkpoint"]["experiment"] == "A" and rec["checkpoint"]["step"] == 7
    assert cfg["source"]["weights_sha256"][:8] in os.path.basename(new)


def test_two_experiments_at_the_same_step_do_not_collide(tmp_path):
    _, a = make_checkpoint(str(tmp_path / "exps" / "A"), seed=0)
    _, b = make_checkpoint(str(tmp_path / "exps" / "B"), seed=0)  # even with identical weights
    na = sample_main(["--ckpt", a, "--sample-dir", str(tmp_path / "s"), *ARGS])
    nb = sample_main(["--ckpt", b, "--sample-dir", str(tmp_path / "s"), *ARGS])
    assert na != nb and "-A-0000007-" in na and "-B-0000007-" in nb


def test_recorded_identity_that_differs_is_refused(tmp_path):
    _, ck = make_checkpoint(str(tmp_path / "exps" / "A"))
    npz = sample_main(["--ckpt", ck, "--sample-dir", str(tmp_path / "s"), *ARGS])
    rec_path = os.path.join(npz[:-4], "sampling.json")
    rec = json.load(open(rec_path))
    rec["checkpoint"]["weights_sha256"] = "0" * 64  # a hash-prefix collision, or a hand-edited record
    open(rec_path, "w").write(json.dumps(rec))
    before = _pngs(npz[:-4])
    with pytest.raises(ValueError, match="checkpoint"):
        sample_main(["--ckpt", ck, "--sample-dir", str(tmp_path / "s"), *ARGS])
    assert _pngs(npz[:-4]) == before


def test_state_dict_hash_is_of_the_bytes(tmp_path):
    import torch
    a = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.zeros(3)}
    b = {"b": torch.zeros(3), "w": torch.arange(6, dtype=torch.float32).view(2, 3)}
    assert state_dict_sha256(a) == state_dict_sha256(b)  # key order does not matter
    c = dict(a, w=a["w"].clone())
    c["w"][1, 2] = 5.0000005
    assert state_dict_sha256(c) != state_dict_sha256(a)
    assert state_dict_sha256(dict(a, w=a["w"].view(3, 2))) != state_dict_sha256(a)  # shape is part of it
    assert state_dict_sha256(dict(a, w=a["w"].double())) != state_dict_sha256(a)  # dtype too


def test_a_folder_that_is_not_ours_is_refused_and_untouched(tmp_path):
    _, ck = make_checkpoint(str(tmp_path / "exps" / "A"))
    npz = sample_main(["--ckpt", ck, "--sample-dir", str(tmp_path / "probe"), *ARGS])
    name = os.path.basename(npz[:-4])
    theirs = tmp_path / "s" / name
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    (theirs / "000000.png").write_bytes(b"not a png of ours")
    with pytest.raises(ValueError, match="not written by repa-sample") as e:
        sample_main(["--ckpt", ck, "--sample-dir", str(tmp_path / "s"), *ARGS])
    assert "notes.txt" in str(e.value) or "000000.png" in str(e.value)
    assert sorted(os.listdir(theirs)) == ["000000.png", "notes.txt"]  # nothing added (no lock, no record)
    assert (theirs / "000000.png").read_bytes() == b"not a png of ours"
    shutil.rmtree(theirs)
    theirs.mkdir()  # an empty folder is fine
    assert os.path.basename(sample_main(["--ckpt", ck, "--sample-dir", str(tmp_path / "s"), *ARGS])) == name + ".npz"


def test_temp_names_are_ours_only(tmp_path):
    for user_file in ["thesis.tmp-2.docx", ".thesis.tmp2", ".bashrc.tmp123", "000001.png.tmp4", ".x.tmp12",
                      "notes.repa-tmp-3.txt"]:
        assert not is_temp_name(user_file), user_file
    t = os.path.basename(temp_path(str(tmp_path / "000003.png")))
    assert is_temp_name(t) and is_temp_name(t, of="000003.png") and not is_temp_name(t, of="000004.png")


def test_cleanup_removes_only_our_temp_files(tmp_path):
    _, ck = make_checkpoint(str(tmp_path / "exps" / "A"))
    run = ["--ckpt", ck, "--sample-dir", str(tmp_path / "s"), *ARGS]
    npz = sample_main(run)
    folder = npz[:-4]
    os.remove(os.path.join(folder, "000002.png"))
    os.remove(npz)
    ours = [temp_path(os.path.join(folder, "000002.png"), pid=99999), temp_path(npz, pid=99999)]
    users = [os.path.join(folder, "thesis.tmp-2.docx"), os.path.join(folder, ".thesis.tmp2"),
             str(tmp_path / "s" / ".other.npz.tmp7"), str(tmp_path / "s" / "thesis.tmp-2.docx")]
    for p in ours + users:
        open(p, "wb").write(b"x")
    assert sample_main(run) == npz
    assert [os.path.exists(p) for p in ours] == [False, False]
    assert all(open(p, "rb").read() == b"x" for p in users)
