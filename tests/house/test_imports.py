"""The import rules of the house, checked on the source (AST), so a violation names the file and line.

Data flows one way: preprocess -> shards -> trainer -> sampler. Frozen-model loading (VAE, teachers, text
encoder, hub helpers) lives in ``repa.preprocess`` and is the one part of it every later stage may use.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("shards", "preprocess", "trainer", "sampler")
FROZEN = {"repa.preprocess.vae", "repa.preprocess.teachers", "repa.preprocess.hub", "repa.preprocess.text_encoder",
          "repa.preprocess.demo_teacher"}  # the demo builds its frozen teacher and autoencoder there
# what each stage may import of ours, besides itself
ALLOWED = {
    "shards": set(),
    "preprocess": {"repa.shards"},
    "trainer": {"repa.shards"} | FROZEN,
    "sampler": {"repa.shards", "repa.trainer.models", "repa.trainer.mmdit", "repa.trainer.loss",
                "repa.trainer.checkpoint", "repa.trainer.metrics"} | FROZEN,
}
# a comment on the import line that says why it is function-local
OPTIONAL_MARK = "optional"


def _ours(stage: str, path: Path, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "repa"]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the module's package
            pkg = ["repa", stage, *path.relative_to(ROOT / stage).parent.parts]
            base = pkg[:len(pkg) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        if mod.split(".")[0] != "repa":
            return []
        return [mod] if node.module or node.level else []
    return []


def _modules():
    for stage in STAGES:
        for path in sorted((ROOT / stage).rglob("*.py")):
            yield stage, path


def _allowed(stage: str, mod: str) -> bool:
    if mod == f"repa.{stage}" or mod.startswith(f"repa.{stage}."):
        return True
    return any(mod == a or mod.startswith(a + ".") for a in ALLOWED[stage])


def test_no_upward_or_sideways_imports():
    bad = []
    for stage, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            for mod in _ours(stage, path, node):
                if not _allowed(stage, mod):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {stage} imports {mod}")
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_no_function_local_imports_of_our_modules():
    bad = []
    for stage, path in _modules():
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if _ours(stage, path, node) and OPTIONAL_MARK not in lines[node.lineno - 1]:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, ("function-local imports of repa modules (move them to the top, or mark an optional heavy "
                     "dependency with a '# optional: ...' comment):\n" + "\n".join(sorted(set(bad))))


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_cleanly_on_its_own(stage, tmp_path):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", f"import repa.{stage}"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
