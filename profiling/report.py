"""Results report: tables, plots and the targets of the kernel issues, from a results CSV.

    python -m profiling.report profiling/results/NVIDIA_H100_80GB_HBM3.csv            # print the tables
    python -m profiling.report profiling/results/NVIDIA_H100_80GB_HBM3.csv --readme README.md --plots

Reads the rows that ``bench_ops``, ``bench_u2pl_stage`` and ``bench_steps`` append (the newest row
of each op, case, dtype, provider and mode wins, so a re-run replaces what it re-measured) and
renders:

* the ceilings measured in the run (copy bandwidth, matmul rates);
* one line per op case: the fused time, every other provider's time and the speed-up over it,
  the fraction of the ceiling reached and the peak memory;
* one line per method: ms/step fused and on the references, the speed-up, peak memory, host
  synchronisations and graph breaks;
* the targets of the kernel issues and of the step suite, each "met", "missed" (with the measured
  value) or "not measured";
* with ``--plots``, PNG bar charts next to the CSV (``<csv stem>_ops.png``, ``<csv stem>_steps.png``;
  needs matplotlib: ``pip install -e ".[bench]"``).

``--readme`` replaces the text between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in the
given file, stating device, versions, commit and date of the rows shown.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from semiseg_fast.fileio import atomic_write_text

from .harness import read_rows

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
Row = dict[str, str]


def load(path: Path) -> list[Row]:
    """The newest row of every (op, case, dtype, provider, mode), in first-seen order."""
    if not path.is_file():
        raise FileNotFoundError(f"csv: no results file at {path}")
    latest: dict[tuple, Row] = {}
    for row in read_rows(path):
        latest[(row["op"], row["case"], row["dtype"], row["provider"], row["mode"])] = row
    return list(latest.values())


def _f(row: Row | None, key: str) -> float | None:
    if row is None or not row.get(key):
        return None
    return float(row[key])


def _fmt(x: float | None, spec: str = ".3g", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _groups(rows: list[Row], mode_filter: Callable[[str], bool]) -> dict[tuple, dict[str, Row]]:
    out: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        if row["op"] == "ceiling" or not mode_filter(row["mode"]):
            continue
        out.setdefault((row["op"], row["case"], row["dtype"], row["mode"]), {})[row["provider"]] = row
    return out


def op_groups(rows: list[Row]) -> dict[tuple, dict[str, Row]]:
    return _groups(rows, lambda mode: mode != "step")


def step_groups(rows: list[Row]) -> dict[tuple, dict[str, Row]]:
    return _groups(rows, lambda mode: mode == "step")


def speedup(group: dict[str, Row], over: str, provider: str = "fused") -> float | None:
    mine, other = _f(group.get(provider), "ms_median"), _f(group.get(over), "ms_median")
    return None if mine is None or other is None or mine <= 0 else other / mine


def ceiling_pct(row: Row | None) -> tuple[float | None, str]:
    """Fraction of the measured ceiling (GB/s of the copy or TFLOP/s of the matmul) and its kind."""
    if row is None:
        return None, ""
    if row.get("pct_of_matmul"):
        return float(row["pct_of_matmul"]), "matmul"
    if row.get("pct_of_copy"):
        return float(row["pct_of_copy"]), "copy"
    return None, ""


# -- targets ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """A number a kernel issue asks for: ``metric`` of the rows of ``op`` whose case starts with
    ``case`` (every dtype), compared with ``bound`` (``at_least`` or at most)."""
    issue: str
    text: str
    op: str
    case: str
    mode: str
    metric: str  # "speedup:<provider>", "pct", "peak_ratio:<provider>", "syncs", "breaks"
    bound: float
    at_least: bool = True


TARGETS = (
    Target("4", "spatial KL fwd+bwd within 2x of the bytes floor", "spatial_kl", "", "fwd+bwd", "pct", 50.0),
    Target("4", "spatial KL >= 4x the eager reference", "spatial_kl", "", "fwd+bwd", "speedup:reference", 4.0),
    Target("4", "spatial KL >= 2x the compiled reference", "spatial_kl", "", "fwd+bwd", "speedup:compiled", 2.0),
    Target("5", "entropy + thresholds within 1.5x of one read of the logits", "entropy_percentile", "voc", "fwd",
           "pct", 100 / 1.5),
    Target("5", "entropy + thresholds >= 20x the official path", "entropy_percentile", "voc", "fwd",
           "speedup:official", 20.0),
    Target("6", "CTT dense fwd+bwd >= 50% of the matmul rate", "class_bank_contrast", "voc", "fwd+bwd", "pct", 50.0),
    Target("6", "CTT dense >= 10x the eager reference at VOC", "class_bank_contrast", "voc", "fwd+bwd",
           "speedup:reference", 10.0),
    Target("6", "U2PL contrastive stage >= 20x the official-style path", "u2pl_contrast_stage", "", "stage",
           "speedup:official", 20.0),
    Target("7", "MLLC graph fwd+bwd >= 50x the official-style layer at VOC", "graph_mix", "voc", "fwd+bwd",
           "speedup:official", 50.0),
    Target("7", "similarity tiles >= 50% of the matmul rate", "graph_mix", "voc", "graph", "pct", 50.0),
    Target("8", "every method's step >= 1.5x faster with fused ops", "*", "", "step", "speedup:reference", 1.5),
    Target("8", "every method's step <= 0.6x the peak memory", "*", "", "step", "peak_ratio:reference", 0.6,
           at_least=False),
    Target("8", "zero host syncs in the step", "*", "", "step", "syncs", 0.0, at_least=False),
    Target("8", "zero graph breaks", "*", "", "step", "breaks", 0.0, at_least=False),
)


def _metric(group: dict[str, Row], metric: str) -> float | None:
    kind, _, provider = metric.partition(":")
    fused = group.get("fused")
    if kind == "speedup":
        return speedup(group, provider)
    if kind == "pct":
        return ceiling_pct(fused)[0]
    if kind == "peak_ratio":
        mine, other = _f(fused, "peak_mb"), _f(group.get(provider), "peak_mb")
        return None if mine is None or not other else mine / other
    if kind == "syncs":
        return _f(fused, "host_syncs")
    if kind == "breaks":
        return _f(fused, "graph_breaks")
    raise ValueError(f"metric: unknown {metric!r}")


def check_targets(rows: list[Row]) -> list[tuple[Target, str, str]]:
    """(target, verdict, detail): verdict "met", "missed" or "not measured"; the worst case decides."""
    groups = {**op_groups(rows), **step_groups(rows)}
    out = []
    for t in TARGETS:
        values = []
        for (op, case, dtype, mode), group in groups.items():
            if (t.op == "*" and mode == "step") or (
                    op == t.op and case.startswith(t.case) and mode == t.mode):
                value = _metric(group, t.metric)
                if value is not None:
                    values.append((value, f"{op} {case} {dtype}"))
        if not values:
            out.append((t, "not measured", ""))
            continue
        worst = min(values) if t.at_least else max(values)
        ok = worst[0] >= t.bound if t.at_least else worst[0] <= t.bound
        out.append((t, "met" if ok else "missed", f"worst {worst[0]:.3g} ({worst[1]})"))
    return out


# -- rendering ----------------------------------------------------------------------------------

def _table(header: list[str], body: list[list[str]]) -> list[str]:
    """Markdown table lines, then a blank line."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in body), ""]


def markdown(rows: list[Row], plots: list[Path] = (), relative_to: Path | None = None) -> str:
    if not rows:
        return "No results yet.\n"
    first = rows[0]
    commits = sorted({r["commit"] for r in rows})
    dates = sorted({r["date"] for r in rows})
    lines = [f"Device **{first['device']}**, torch {first['torch']}, triton {first['triton']}, "
             f"commit {', '.join(commits)}, {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")
             + ". Medians; generated by `python -m profiling.report` from the CSV.", ""]
    ceilings = [r for r in rows if r["op"] == "ceiling"]
    if ceilings:
        lines += _table(["ceiling", "measured"], [
            [r["case"], _fmt(_f(r, "gb_s"), ".4g", " GB/s") if r.get("gb_s") else _fmt(_f(r, "tflop_s"), ".4g", " TFLOP/s")]
            for r in ceilings])
    body = []
    for (op, case, dtype, mode), group in op_groups(rows).items():
        fused = group.get("fused")
        others = ", ".join(f"{p} {_fmt(_f(r, 'ms_median'))} ({_fmt(speedup(group, p), '.3g', 'x')})"
                           if r.get("ms_median") else f"{p} {r.get('note') or 'n/a'}"
                           for p, r in group.items() if p != "fused")
        pct, kind = ceiling_pct(fused)
        body.append([op, case, dtype, mode, _fmt(_f(fused, "ms_median")), others or "-",
                     _fmt(pct, ".1f", f"% {kind}"), _fmt(_f(fused, "peak_mb"), ".0f")])
    if body:
        lines += _table(["op", "case", "dtype", "mode", "fused ms", "other providers (ms, fused speed-up)",
                         "% of ceiling", "peak MB fused"], body)
    body = []
    for (op, case, dtype, mode), group in step_groups(rows).items():
        fused, reference = group.get("fused") or {}, group.get("reference")
        body.append([op, case, _fmt(_f(fused, "ms_median")), _fmt(_f(reference, "ms_median")),
                     _fmt(speedup(group, "reference"), ".3g", "x"),
                     f"{_fmt(_f(fused, 'peak_mb'), '.0f')} / {_fmt(_f(reference, 'peak_mb'), '.0f')}",
                     fused.get("host_syncs") or "n/a", fused.get("graph_breaks") or "n/a"])
    if body:
        lines += _table(["method", "case", "fused ms/step", "reference ms/step", "speed-up", "peak MB fused / ref",
                         "host syncs", "graph breaks"], body)
    lines += _table(["issue", "target", "verdict", "measured"],
                    [[t.issue, t.text, verdict, detail or "-"] for t, verdict, detail in check_targets(rows)])
    for p in plots:
        shown = Path(os.path.relpath(p.resolve(), relative_to)) if relative_to is not None else p
        lines.append(f"![{p.stem}]({shown.as_posix()})")
    return "\n".join(lines).rstrip() + "\n"


def _bar_chart(plt, path: Path, names: list[str], series: dict[str, list[float]], xlabel: str, log: bool) -> Path:
    """Horizontal grouped bars, one group per name and one bar per series; saved as PNG."""
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(names) * max(len(series), 1) ** 0.5 + 1.5))
    height = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.barh([k + i * height for k in range(len(names))], values, height, label=label)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(names))], names, fontsize=7)
    if log:
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_plots(rows: list[Row], stem: Path) -> list[Path]:
    """Bar charts of the fused speed-ups (ops) and of ms/step (methods); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    ops = list(op_groups(rows).items())
    if ops:
        providers = sorted({p for _, g in ops for p in g if p != "fused"})
        written.append(_bar_chart(
            plt, stem.with_name(stem.name + "_ops.png"), [" ".join(key) for key, _ in ops],
            {f"vs {p}": [speedup(g, p) or 0 for _, g in ops] for p in providers},
            "fused speed-up (other provider's median / fused median)", log=True))
    steps = list(step_groups(rows).items())
    if steps:
        written.append(_bar_chart(
            plt, stem.with_name(stem.name + "_steps.png"), [f"{op} {case}" for (op, case, _, _), _ in steps],
            {p: [_f(g.get(p), "ms_median") or 0 for _, g in steps] for p in ("fused", "reference")},
            "ms per step (median)", log=False))
    return written


def update_readme(readme: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block of ``readme`` between the ``begin`` and ``end`` markers (atomically)."""
    BEGIN, END = begin, end  # noqa: N806 (the module's markers by default)
    body = readme.read_text()
    if BEGIN not in body or END not in body or body.index(BEGIN) > body.index(END):
        raise ValueError(f"readme: {readme} has no '{BEGIN}' ... '{END}' block to replace")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.report", description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="a results CSV (profiling/results/<device>.csv)")
    parser.add_argument("--plots", action="store_true", help="write PNG plots next to the CSV")
    parser.add_argument("--readme", type=Path, help="replace the results block of this Markdown file")
    args = parser.parse_args(argv)
    rows = load(args.csv)
    plots = render_plots(rows, args.csv.with_suffix("")) if args.plots else []
    if args.plots and not plots and rows:
        print("matplotlib is not installed: no plots (pip install -e \".[bench]\")")
    text = markdown(rows, plots, relative_to=args.readme.resolve().parent if args.readme else None)
    if args.readme:
        update_readme(args.readme, text)
        print(f"updated the results block of {args.readme}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
