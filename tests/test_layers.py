"""Dependencies point one way, down the layers (README, "Architecture"):

    kernels -> base -> reference -> ops -> models, data -> methods -> engine -> cli

A module may import its own room and the rooms below it, nothing above it and nothing beside
it (models and data do not import each other). Every import counts, also those inside functions
and under ``TYPE_CHECKING``: an upward import is a circle waiting to happen.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: room -> the modules it holds (prefixes of dotted names); ``kernels`` is the top-level folder,
#: mounted as ``semiseg_fast.kernels``
ROOMS = {
    "root": (),  # the package's __init__ alone: the version, and the mount of kernels/ and csrc/
    "kernels": ("kernels", "semiseg_fast.kernels", "semiseg_fast.csrc"),
    "base": ("semiseg_fast.errors", "semiseg_fast.fileio", "semiseg_fast.nvtx", "semiseg_fast.collectives"),
    "reference": ("semiseg_fast.reference",),
    "ops": ("semiseg_fast.ops",),
    "models": ("semiseg_fast.models",),
    "data": ("semiseg_fast.data",),
    "methods": ("semiseg_fast.methods",),
    "engine": ("semiseg_fast.engine",),
    "cli": ("semiseg_fast.config", "semiseg_fast.cli", "semiseg_fast.pretrain", "train"),
}
#: room -> the rooms it may import besides itself
BELOW = {
    "root": {"kernels"},
    "kernels": set(),
    "base": set(),
    "reference": {"base"},
    "ops": {"kernels", "base", "reference"},
    "models": {"base", "ops"},
    "data": {"base", "ops"},
    "methods": {"base", "reference", "ops", "models", "data"},
    "engine": {"base", "ops", "models", "data", "methods"},
    "cli": {"base", "ops", "models", "data", "methods", "engine"},
}


def room_of(module: str) -> str | None:
    if module == "semiseg_fast":
        return "root"
    best = None
    for room, prefixes in ROOMS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (room, prefix)
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, the module ``name``; ``from x import y``
    gives x.y too, since y may be a sub-module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def package_files() -> list[Path]:
    return sorted([*(REPO / "semiseg_fast").rglob("*.py"), *(REPO / "kernels").glob("*.py"), REPO / "train.py"])


def test_every_module_has_a_room():
    homeless = [module_name(p) for p in package_files() if room_of(module_name(p)) is None]
    assert not homeless, f"modules outside every room of ROOMS: {homeless}"


def violations(path: Path, name: str) -> list[str]:
    room = room_of(name)
    bad = []
    for line, target in imports(path, name):
        # "from .. import ops" names the package root too; the root itself (the version) is free
        if target == "semiseg_fast" or target.split(".")[0] not in ("semiseg_fast", "kernels", "train"):
            continue
        other = room_of(target)
        if other is not None and other != room and other not in BELOW[room]:
            bad.append(f"{path.name}:{line} ({room}) imports {target} ({other})")
    return sorted(set(bad))


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    bad = violations(path, module_name(path))
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_the_checker_sees_upward_and_sideways_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..config import TrainConfig\n\ndef f():\n    from ..engine import trainer\n"
                     "    from semiseg_fast.models import resnet\n")
    assert violations(probe, "semiseg_fast.methods.probe") == [
        "probe.py:1 (methods) imports semiseg_fast.config (cli)",
        "probe.py:1 (methods) imports semiseg_fast.config.TrainConfig (cli)",
        "probe.py:4 (methods) imports semiseg_fast.engine (engine)",
        "probe.py:4 (methods) imports semiseg_fast.engine.trainer (engine)",
    ]
    assert violations(probe, "semiseg_fast.data.probe")[-1] == "probe.py:5 (data) imports semiseg_fast.models.resnet (models)"
