"""The package builds as a wheel that carries kernels/ and csrc/ inside semiseg_fast, and nothing
generically named at the top level; it imports from the installed wheel away from the checkout."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_checkout_mounts_top_level_folders():
    import semiseg_fast.kernels

    import semiseg_fast

    assert Path(semiseg_fast.kernels.__file__).parent == REPO / "kernels"
    assert semiseg_fast.csrc_dir() == REPO / "csrc"


@pytest.mark.slow
def test_wheel_layout_and_import(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("semiseg_fast", "kernels", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    wheel = next(dist.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"semiseg_fast", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    # every package folder of the checkout is in the wheel (the pyproject list is explicit)
    for init in (REPO / "semiseg_fast").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, init
    assert "semiseg_fast/kernels/__init__.py" in names and "semiseg_fast/csrc/__init__.py" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import semiseg_fast, semiseg_fast.kernels, semiseg_fast.models, semiseg_fast.engine.trainer;"
        "print(semiseg_fast.__file__); print(semiseg_fast.kernels.__file__); print(semiseg_fast.csrc_dir())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert all(line.startswith(str(site)) for line in out), out
