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
