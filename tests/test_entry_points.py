"""The console scripts declared in pyproject.toml exist and exit 0 on success.

setuptools' wrapper does ``sys.exit(func())``: a function that returns a value (a path, a dict) would make
the process exit 1 after a successful run.
"""
import importlib
import tomllib
from pathlib import Path

import pytest

SCRIPTS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_commands_are_declared():
    assert set(SCRIPTS) == {"repa-preprocess", "repa-train", "repa-sample", "repa-eval", "repa-verify"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_exit_status_is_zero(name, monkeypatch):
    module, func = SCRIPTS[name].split(":")
    mod = importlib.import_module(module)
    entry = getattr(mod, func)
    if hasattr(entry, "main") and hasattr(entry, "params"):  # a click command: standalone mode exits 0 itself
        return
    monkeypatch.setattr(mod, "main", lambda *a, **k: {"a result": "that must not become the exit status"})
    assert entry() in (0, None)


@pytest.mark.parametrize("module", ["repa.sampler", "repa.sampler.eval_cli"])
def test_sampler_modules_run_as_commands(module):
    """``python -m`` (what torchrun -m runs) reaches the same click commands (-h exits 0)."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", module, "-h"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Usage: " in res.stdout and "--no-progress" in res.stdout, res.stderr
