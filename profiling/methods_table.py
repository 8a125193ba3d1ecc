"""Every method against supervised-only at one stated budget: the table of the README.

    python -m profiling.methods_table --data fashion --pretrained weights/fashion_r18.pt --jobs 2 --readme README.md
    python -m profiling.methods_table --data synthetic --pretrained weights/synthetic_r18.pt --jobs 2 --readme README.md

Cells: the seven methods at 1/16 of the labels with seeds 0 and 1 and at 1/8 with seed 0, and
supervised-only with every label (the upper bound). Each cell is one ``train.py`` run in its own
process (``--jobs`` at a time, the cores shared out between them as torch threads) under
``--runs/<data>/<cell>``; its final validation mIoU, per-class IoU, the last diagnostics
(``diag/*``: pseudo-label accuracy against the hidden labels, confident share) and the share of
iterations each method's extra term was on (``switch/*``) become one row of
``profiling/results/methods_<data>.csv``. A cell whose row is already in the CSV with the same
budget is skipped, and an interrupted cell continues from its ``latest.pt``, so the command can be
stopped and run again. ``--readme`` rewrites the README's table for the data set from the CSV.

The budget is ``BUDGET`` plus ``--iters`` (the same for every method: iterations, crop, batch,
learning rates), and ``PRESETS`` the per-method options adapted to a pretrained backbone; both are
written to every row.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .harness import RESULTS, read_rows, stamp, write_rows
from .report import update_readme

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("supervised", "fixmatch", "unimatch", "ipixmatch", "u2pl", "ctt", "mllc")
#: (fraction, seed) cells of every method, then the all-labels cell of supervised-only
CELLS = (("1/16", 0), ("1/16", 1), ("1/8", 0))
ALL_LABELS = ("1.0", 0)
#: what every run shares; a pretrained backbone gets a lower backbone rate and a 10x head
BUDGET = {"crop": 48, "batch-size": 8, "lr": 0.005, "head-lr-mult": 10.0, "eval-every": 0}
#: per-method options for a pretrained backbone and a run of a few hundred iterations (everything
#: else: the method's CPU preset): a supervised fashion model after 200 such iterations is at least
#: 0.95 confident on 1.2 % of the garment pixels of unlabeled images (its diag/confident_share_objects),
#: so the thresholded methods take 0.8; the mean teachers average over ~20 iterations (decay 0.95)
#: instead of ~100 (0.99), two thirds of such a run
_TEACHER = {"ema-decay": 0.95}
PRESETS: dict[str, dict[str, object]] = {
    "fixmatch": {"conf-thresh": 0.8} | _TEACHER, "unimatch": {"conf-thresh": 0.8},
    "ipixmatch": {"conf-thresh": 0.8}, "u2pl": _TEACHER, "ctt": _TEACHER,
    # at a 10x head (0.05) MLLC's loss went NaN from iteration 20 of the fashion 1/16 run
    "mllc": {"head-lr-mult": 1.0},
}
FIXED = ["data", "method", "fraction", "seed", "iters", "budget", "preset", "pretrained"]
TAIL = ["miou", "pixel_acc", "wall_s", "date", "commit", "torch", "threads"]


def cell_name(method: str, fraction: str, seed: int) -> str:
    return f"{method}-{fraction.replace('/', 'of')}-s{seed}"


def cells(methods: tuple[str, ...] = METHODS) -> list[tuple[str, str, int]]:
    out = [(m, f, s) for m in methods for f, s in CELLS]
    if "supervised" in methods:
        out.append(("supervised",) + ALL_LABELS)
    return out


def command(data: str, method: str, fraction: str, seed: int, iters: int, pretrained: str | None, run_dir: Path,
            extra: list[str]) -> list[str]:
    args = [sys.executable, str(ROOT / "train.py"), "--data", data, "--method", method, "--labeled", fraction,
            "--seed", str(seed), "--iters", str(iters), "--out", str(run_dir), "--no-progress"]
    for key, value in BUDGET.items():
        args += [f"--{key}", str(value)]
    for key, value in PRESETS.get(method, {}).items():
        args += [f"--{key}", str(value)]
    if pretrained:
        args += ["--pretrained", pretrained]
    return args + extra


def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every tag of a run's ``metrics.csv``."""
    out: dict[str, float] = {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            out[row["tag"]] = float(row["value"])
    return out


def run_cell(key: dict, argv: list[str], run_dir: Path, threads: int, echo) -> dict:
    """Run (or continue) one cell and return its row."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    argv = argv + (["--resume"] if (run_dir / "latest.pt").is_file() else ["--overwrite"])
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        done = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"cell {run_dir.name} failed (exit {done.returncode}); see {run_dir.parent / run_dir.name}.log"
                           f"\n  {shlex.join(argv)}")
    values = last_values(run_dir / "metrics.csv")
    row = dict(key) | {"miou": f"{100 * values['val/mIoU']:.2f}", "pixel_acc": f"{100 * values['val/pixel_acc']:.2f}",
                       "wall_s": f"{wall:.0f}", "threads": str(threads)}
    for tag, value in values.items():
        if tag.startswith("val/IoU/"):
            row["iou_" + tag[len("val/IoU/"):]] = f"{100 * value:.2f}"
        elif tag.startswith(("diag/", "switch/")):
            row[tag.replace("/", "_")] = f"{value:.4g}"
    echo(f"{run_dir.name}: mIoU {row['miou']} in {wall:.0f} s")
    return row


def _same_budget(row: dict, key: dict) -> bool:
    return all(str(row.get(k, "")) == str(v) for k, v in key.items())


def run_table(data: str, iters: int, pretrained: str | None, jobs: int, out_csv: Path, runs: Path,
              methods: tuple[str, ...] = METHODS, extra: list[str] = (), echo=print) -> list[dict]:
    rows = read_rows(out_csv) if out_csv.is_file() else []
    todo = []
    for method, fraction, seed in cells(methods):
        key = {"data": data, "method": method, "fraction": fraction, "seed": str(seed), "iters": str(iters),
               "budget": json.dumps(BUDGET, sort_keys=True), "preset": json.dumps(PRESETS.get(method, {}), sort_keys=True),
               "pretrained": Path(pretrained).name if pretrained else "none"}
        if any(_same_budget(r, key) for r in rows):
            echo(f"{cell_name(method, fraction, seed)}: in {out_csv} already, skipped")
            continue
        run_dir = runs / data / cell_name(method, fraction, seed)
        todo.append((key, command(data, method, fraction, seed, iters, pretrained, run_dir, list(extra)), run_dir))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = stamp()
    echo(f"{len(todo)} cells to run, {jobs} at a time with {threads} thread(s) each")

    failed = []

    def one(item):
        key, argv, run_dir = item
        try:
            row = run_cell(key, argv, run_dir, threads, echo) | {k: env[k] for k in ("date", "commit", "torch")}
        except RuntimeError as e:  # the other cells still run; the table says which failed
            echo(f"error: {e}")
            failed.append(run_dir.name)
            return None
        rows.append(row)
        _write(out_csv, rows)  # after every cell: a stopped table keeps what finished
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(one, todo):
            pass
    if failed:
        raise RuntimeError(f"{len(failed)} cell(s) failed: {', '.join(failed)} (their logs are beside their run "
                           f"directories; run the command again to retry them)")
    return rows


def _write(out_csv: Path, rows: list[dict]) -> None:
    extra = sorted({k for r in rows for k in r} - set(FIXED) - set(TAIL))
    iou = [k for k in extra if k.startswith("iou_")]
    rest = [k for k in extra if not k.startswith("iou_")]
    write_rows(out_csv, FIXED + ["miou"] + iou + rest + [k for k in TAIL if k != "miou"], rows)


# -- the README table ----------------------------------------------------------------------------

def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def markdown(rows: list[dict], data: str) -> str:
    """The table of ``rows`` (one data set, one budget): mean and half-range of the seeds at 1/16,
    1/8, the gain over supervised-only, the last pseudo-label diagnostics and the extra term's share."""
    rows = [r for r in rows if r["data"] == data]
    if not rows:
        return f"(no rows for {data} yet)\n"

    def cell(method: str, fraction: str) -> list[float]:
        return [float(r["miou"]) for r in rows if r["method"] == method and r["fraction"] == fraction]

    def fmt(values: list[float]) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{_mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"

    def gain(method: str, fraction: str) -> str:
        m, s = _mean(cell(method, fraction)), _mean(cell("supervised", fraction))
        return "" if m is None or s is None or method == "supervised" else f"{m - s:+.1f}"

    def diag(method: str, name: str) -> str:
        vals = [float(r[name]) for r in rows if r["method"] == method and r["fraction"] == "1/16" and r.get(name)]
        return f"{100 * _mean(vals):.0f} %" if vals else "-"

    def switch(method: str) -> str:
        names = [k for r in rows if r["method"] == method for k in r if k.startswith("switch_") and r[k]]
        if not names:
            return "-"
        vals = [float(r[k]) for r in rows if r["method"] == method and r["fraction"] == "1/16" for k in names if r.get(k)]
        return f"{names[0][len('switch_'):]} {100 * _mean(vals):.0f} %" if vals else "-"

    lines = ["| method | 1/16 (2 seeds) | vs supervised | 1/8 | vs supervised | pseudo-labels right on object "
             "pixels (1/16) | object pixels passing the confidence rule | extra term on (share of iterations) |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if not any(r["method"] == method for r in rows):
            continue
        lines.append(f"| {method} | {fmt(cell(method, '1/16'))} | {gain(method, '1/16')} | {fmt(cell(method, '1/8'))} | "
                     f"{gain(method, '1/8')} | {diag(method, 'diag_pl_acc_objects')} | "
                     f"{diag(method, 'diag_confident_share_objects')} | {switch(method)} |")
    full = cell("supervised", "1.0")
    if full:
        lines.append(f"| supervised, all labels | {fmt(full)} | | | | | | |")
    first = rows[0]
    walls = sorted(float(r["wall_s"]) for r in rows)
    lines.append("")
    presets = {r["method"]: r["preset"] for r in rows if r.get("preset") not in (None, "", "{}")}
    preset_text = "; ".join(f"{m} `{p}`" for m, p in presets.items()) or "none"
    lines.append(f"Budget: {first['iters']} iterations, `{first['budget']}`, per-method options: {preset_text} "
                 f"(the rest: the methods' CPU presets); backbone {first['pretrained']}; commit {first['commit']}, "
                 f"torch {first['torch']}, {first['date']}; wall per cell {walls[0]:.0f}-{walls[-1]:.0f} s "
                 f"({first['threads']} thread(s) each). Source: `profiling/results/methods_{data}.csv`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.methods_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion", help="fashion | synthetic")
    p.add_argument("--pretrained", default=None, help="backbone weights (python -m semiseg_fast.pretrain)")
    p.add_argument("--iters", type=int, default=150, help="training iterations of every cell")
    p.add_argument("--jobs", type=int, default=2, help="cells at a time (the cores are shared out)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--out", type=Path, default=None, help="CSV (default profiling/results/methods_<data>.csv)")
    p.add_argument("--runs", type=Path, default=Path("runs/methods_table"), help="run directories of the cells")
    p.add_argument("--readme", type=Path, default=None, help="rewrite this README's table for --data")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the CSV")
    p.add_argument("train_args", nargs="*", help="after --: more train.py options for every cell")
    args = p.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.jobs < 1 or args.iters < 1:
        p.error(f"--methods: unknown {unknown}" if unknown else "--jobs and --iters must be >= 1")
    if args.pretrained and not Path(args.pretrained).is_file():
        p.error(f"--pretrained: {args.pretrained} not found (make it with python -m semiseg_fast.pretrain "
                f"--data {args.data})")
    out = args.out or RESULTS / f"methods_{args.data}.csv"
    if args.table_only:
        rows = read_rows(out)
    else:
        try:
            rows = run_table(args.data, args.iters, args.pretrained, args.jobs, out, args.runs, methods,
                             args.train_args)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    text = markdown(rows, args.data)
    print(text)
    if args.readme:
        update_readme(args.readme, text, begin=f"<!-- methods-table:{args.data} -->",
                      end=f"<!-- /methods-table:{args.data} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
