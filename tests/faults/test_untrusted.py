"""Untrusted files: no code path unpickles data from repa.shards or checkpoints, and a malicious pickle given as
``repa-sample --ckpt`` or inside a ``repa-train --resume`` checkpoint is refused without running its payload."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shards", "preprocess", "trainer", "sampler", "bench")
# torch.hub.load runs a hub repo's code (the DINOv2 teacher, by design: trust_repo); it reads no data of ours
ALLOWED_CALLS = {"torch.hub.load"}


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def test_no_unpickling_code_path(faults):
    problems, n_loads = [], 0
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for name, node in _calls(path):
                where = f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:120]}"
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if name == "torch.load" or name.endswith(".torch.load"):
                    n_loads += 1
                    if kw.get("weights_only") != "True":
                        problems.append(f"{where}: torch.load without weights_only=True")
                elif re.fullmatch(r"(c?[pP]ickle|dill|joblib|cloudpickle|_pickle)\.(load|loads|Unpickler)", name):
                    problems.append(f"{where}: unpickles")
                elif name.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle", "False") != "False":
                    problems.append(f"{where}: np.load with allow_pickle")
                elif name.endswith("torch.hub.load") and name not in ALLOWED_CALLS:
                    problems.append(f"{where}: hub load")
            text = path.read_text()
            if re.search(r"^\s*(from\s+(pickle|dill|joblib)\s+import\s+(load|loads|Unpickler))", text, re.M):
                problems.append(f"{path}: imports an unpickler")
    assert not problems, "\n".join(problems)
    assert n_loads >= 3  # the scan does see the torch.load calls (teachers, checkpoint, sampler, inception)


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the file appears iff something unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pt(path: Path, marker: Path, wrap=None) -> Path:
    obj = {"ema": {"x_embedder.proj.weight": torch.zeros(1)}, "payload": Payload(str(marker))}
    torch.save(wrap(obj) if wrap else obj, path)
    return path


def test_malicious_ckpt_refused_by_repa_sample(tmp_path, faults):
    from repa.sampler.sample_cli import main
    marker = tmp_path / "PWNED"
    pt = malicious_pt(tmp_path / "evil.pt", marker)
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(pt), "--num-fid-samples", "1", "--sample-dir", str(tmp_path / "s"), "--no-progress"])
    assert "refused to unpickle" in str(e.value) and str(pt) in str(e.value)
    assert not marker.exists()
    faults.record(faults=1, kind="malicious pickle")


def test_malicious_train_state_refused_by_repa_train(tmp_path, faults):
    from _train_shards import write_shards
    from faults.test_kill import train_cfg
    from repa.trainer.train import train
    shards = write_shards(str(tmp_path / "s"), n=16)
    good = train(train_cfg(shards, tmp_path, "good", max_train_steps=1))["checkpoint"]
    evil = tmp_path / "evil" / "0000001"
    evil.mkdir(parents=True)
    for name in ("model.safetensors", "ema.safetensors", "config.json"):
        (evil / name).write_bytes((Path(good) / name).read_bytes())
    marker = tmp_path / "PWNED"
    state = torch.load(Path(good) / "train_state.pt", weights_only=True)
    malicious_pt(evil / "train_state.pt", marker, wrap=lambda obj: {**state, "extra": obj})
    with pytest.raises(ValueError, match=r"train_state\.pt.*refused to unpickle"):
        train(train_cfg(shards, tmp_path, "resumed", resume=str(evil), max_train_steps=2))
    assert not marker.exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()
    faults.record(faults=1, kind="malicious pickle")
