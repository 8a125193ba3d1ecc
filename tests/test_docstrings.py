"""Every public function that takes tensors says what it takes: shapes and dtypes in its docstring.

The notation, used alike everywhere: a tensor is written with its dtype and its shape in square
brackets, ``p`` float [B, C, H, W], ``labels`` int64 [N], ``ignore`` bool [B, H, W]; "float"
means any floating dtype, a named dtype (float32, bf16, int32, uint8, ...) means exactly that one.
Functions that take tensors are those with a parameter annotated ``Tensor`` and the kernel
launchers (the values of every ``kernels/*.py`` ``LAUNCHERS``).
"""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHAPE = re.compile(r"\[[^\]\n]*\]")
DTYPE = re.compile(r"\b(float|float16|float32|float64|bf16|bfloat16|fp16|fp32|half|int|int8|int32|int64|uint8|"
                   r"bool|long|integer|dtype)s?\b")


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _takes_tensors(fn: ast.FunctionDef) -> bool:
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    return any(a.annotation is not None and "Tensor" in ast.unparse(a.annotation) for a in args)


def _launchers(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LAUNCHERS" for t in node.targets):
            names |= {v.id for v in node.value.values if isinstance(v, ast.Name)}
    return names


def tensor_functions(path: Path):
    """(qualified name, docstring) of the public functions in ``path`` that take tensors."""
    tree = ast.parse(path.read_text())
    launchers = _launchers(tree) if path.parent.name == "kernels" else set()
    found = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef) and _is_public(node.name):
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name in launchers or (_is_public(node.name) and _takes_tensors(node)):
                    found.append((prefix + node.name, ast.get_docstring(node) or ""))

    visit(tree.body, "")
    return found


def _modules():
    files = [*(REPO / "semiseg_fast").rglob("*.py"), *(REPO / "kernels").glob("*.py")]
    return sorted(p for p in files if not any(part.startswith("_") and part != "__init__.py" for part in
                                               p.relative_to(REPO).parts))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_tensor_functions_state_shapes_and_dtypes(path):
    missing = [name for name, doc in tensor_functions(path) if not (SHAPE.search(doc) and DTYPE.search(doc))]
    assert not missing, (f"{path.relative_to(REPO)}: docstrings without a shape [..] and a dtype "
                         f"(notation: tests/test_docstrings.py): {missing}")


def test_the_checker_finds_launchers_and_annotated_functions(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    probe = kernels / "probe.py"
    probe.write_text('def launch(x):\n    return x\n\n'
                     'def helper(x: "Tensor") -> None:\n    """``x`` float32 [N, D]."""\n\n'
                     'class Op:\n    def forward(self, x: "torch.Tensor"):\n        """Scaled."""\n\n'
                     'def _private(x: "Tensor"):\n    pass\n\nLAUNCHERS = {"op": launch}\n')
    found = dict(tensor_functions(probe))
    assert sorted(found) == ["Op.forward", "helper", "launch"]
    assert SHAPE.search(found["helper"]) and DTYPE.search(found["helper"])
    assert not SHAPE.search(found["Op.forward"])
