"""Every kernel the methods' defaults launch compiles for sm_90 and sm_80 (Triton's compiler, no GPU).

The interpreter that runs the other kernel tests accepts code that the compiler rejects and never
allocates registers or shared memory; this test compiles what each method launches at VOC size
(``python -m profiling.aot --subset ci``, in a fresh process without ``TRITON_INTERPRET``) and
holds every configuration to: compiled, shared memory within one block of the target, spill stores
within ``profiling.aot.SPILL_BUDGET`` (the CSV's ``spill_budget``). The full sweep (every dtype, precision, Cityscapes, the
batch-wide graph) is ``python -m profiling.aot``.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("_kl_partials_kernel", "_kl_grad_kernel", "_entropy_kernel", "_teacher_stats_kernel",
           "_radix_hist_kernel", "_rank_mask_kernel", "_sampled_kernel", "_bank_kernel", "_topk_kernel",
           "_degree_kernel", "_apply_kernel")


def _backend_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "Triton's NVIDIA compiler backend is missing"
    return None


pytestmark = pytest.mark.skipif(_backend_missing() is not None, reason=str(_backend_missing()))


def _compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def aot_rows(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("aot")
    proc = subprocess.run([sys.executable, "-m", "profiling.aot", "--subset", "ci", "--out", str(out), "--jobs", "2"],
                          cwd=ROOT, env=_compiler_env(), capture_output=True, text=True, timeout=600)
    rows = {}
    for target in ("sm90", "sm80"):
        path = out / f"aot_{target}.csv"
        assert path.exists(), f"profiling.aot wrote no {path.name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        with path.open() as fh:
            rows[target] = list(csv.DictReader(fh))
    return rows


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_every_kernel_is_compiled(aot_rows, target):
    seen = {r["kernel"] for r in aot_rows[target]}
    assert set(KERNELS) <= seen, f"not launched by the ci cases: {sorted(set(KERNELS) - seen)}"


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_compiles_within_shared_memory_and_spill_budget(aot_rows, target):
    # (profiling.aot is not imported here: this process runs Triton's interpreter)
    failures = []
    for r in aot_rows[target]:
        where = f"{r['kernel']} [{r['config']}] {r['dtype']} ({r['cases']})"
        if r["compiled_ok"] != "True":
            failures.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["spill_bytes"] == "":
            failures.append(f"{where}: no ptxas log, spills unknown")
            continue
        if int(r["shared_bytes"]) > int(r["shared_limit"]):  # 227 KB sm_90, 163 KB sm_80
            failures.append(f"{where}: {r['shared_bytes']} bytes of shared memory > {r['shared_limit']}")
        if int(r["spill_bytes"]) > int(r["spill_budget"]):  # profiling.aot.SPILL_BUDGET
            failures.append(f"{where}: spills {r['spill_bytes']} bytes > budget {r['spill_budget']}")
    assert not failures, "\n".join(failures)


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    """The check can fail: a module-level float used inside @triton.jit (the interpreter takes it,
    the compiler does not) gives a row with compiled_ok False and the compiler's reason."""
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        _NEG_INF: tl.constexpr = float("-inf")  # an annotation does not make a constexpr


        @triton.jit
        def _fill_kernel(out_ptr, N, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out_ptr + offs, tl.full([BLOCK], _NEG_INF, tl.float32), mask=offs < N)
    '''))
    script = textwrap.dedent('''
        import torch
        from profiling import aot
        import broken_kernel
        out = torch.empty(100)
        sig, const, div = aot.specialise(broken_kernel._fill_kernel, (out, 100), {"BLOCK": 128})
        launch = aot.Launch("broken_kernel", "_fill_kernel", sig, const, div, 4, 3)
        row = aot.compile_one(launch, 90)
        print(row["compiled_ok"], row["error"])
    ''')
    env = _compiler_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, _, error = proc.stdout.strip().splitlines()[-1].partition(" ")
    assert ok == "False" and "_NEG_INF" in error, proc.stdout


@pytest.mark.parametrize("target", ["sm90", "sm80"])
def test_graph_passes_lower_the_similarity_tile_alike(aot_rows, target):
    """The degree and apply passes compare recomputed similarities with the top-k pass's theta, so
    each tile must be the same instruction sequence in all three kernels (kernels/graph.py): the
    same tensor-core instructions, in the top-k and degree kernels (which do nothing else with a
    tensor core) exactly, and among the apply kernel's."""
    def kinds(kernel, block):
        found = [set(r["mma_kinds"].split()) for r in aot_rows[target] if r["kernel"] == kernel
                 and f"BLOCK_R={block} " in r["config"] and "CLASS_GRAPH=True" not in r["config"]]
        assert found, (kernel, block)
        return found[0]

    for block in (32, 64):
        topk, degree, apply = (kinds(k, block) for k in ("_topk_kernel", "_degree_kernel", "_apply_kernel"))
        assert topk and topk == degree and topk <= apply, (block, topk, degree, apply)
