"""The distribution installs one namespace, ``repa``: no generic top-level names (``trainer``, ``sampler``,
``shards``, ``preprocess`` are other projects on PyPI).

The wheel is built from this checkout and installed (no deps) into a fresh venv whose only other path is this
venv's site-packages (for torch & co.). The editable install's finder is not active there, so what imports is
what the wheel installs.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):  # build from a copy: setuptools leaves build/ in the source tree
        shutil.copy(ROOT / name, src / name)
    for pkg in ("shards", "preprocess", "trainer", "sampler"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True)
    (whl,) = out.glob("repa-*.whl")
    return whl


def test_wheel_installs_only_the_repa_namespace(wheel):
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"repa"}
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("shards", "preprocess", "trainer", "sampler"):
        assert f"repa/{pkg}/__init__.py" in names
    assert "repa/__init__.py" not in names  # an implicit namespace package


def test_fresh_venv_imports_repa_not_generic_names(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", site,
                    str(wheel)], check=True, capture_output=True)
    # torch, click, ... from this venv, but not its .pth files (the editable finder): a plain path entry
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib.util as u, repa.trainer.models, repa.shards, repa.sampler, repa.preprocess\n"
            "print([u.find_spec(n) is None for n in ('trainer', 'sampler', 'shards', 'preprocess')])\n"
            "print(repa.trainer.models.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([py, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    first, where = res.stdout.split("\n")[:2]
    assert first == "[True, True, True, True]"
    assert where.startswith(site)


@pytest.mark.parametrize("module", ["repa.trainer", "repa.preprocess", "repa.sampler"])
def test_module_entry_points_show_help(module, tmp_path):
    res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout or "usage" in res.stdout
