"""``python -m profiling.methods_table``: cells, resume of finished cells, the CSV and the README table."""
from profiling import methods_table as mt
from profiling.harness import read_rows

TINY = ["--num-train", "16", "--num-val", "4", "--image-size", "32", "--crop", "32", "--batch-size", "2",
        "--cache-dir", ""]


def test_cells_cover_every_method_fraction_and_the_all_labels_row():
    cells = mt.cells()
    assert len(cells) == 3 * len(mt.METHODS) + 1
    assert ("supervised", "1.0", 0) in cells and ("ctt", "1/16", 1) in cells and ("mllc", "1/8", 0) in cells


def test_a_table_runs_skips_finished_cells_and_writes_the_readme_block(tmp_path, monkeypatch):
    out, runs = tmp_path / "t.csv", tmp_path / "runs"
    monkeypatch.setattr(mt, "CELLS", (("1/4", 0),))
    messages = []
    rows = mt.run_table("synthetic", 2, None, 1, out, runs, ("supervised",), TINY, echo=messages.append)
    assert {(r["method"], r["fraction"]) for r in rows} == {("supervised", "1/4"), ("supervised", "1.0")}
    saved = read_rows(out)
    assert len(saved) == 2 and all(0 <= float(r["miou"]) <= 100 for r in saved)
    assert all("iou_background" in r and r["commit"] for r in saved)
    messages.clear()
    mt.run_table("synthetic", 2, None, 1, out, runs, ("supervised",), TINY, echo=messages.append)
    assert sum("skipped" in m for m in messages) == 2 and len(read_rows(out)) == 2  # nothing ran again
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- methods-table:synthetic -->\nold\n<!-- /methods-table:synthetic -->\nb\n")
    assert mt.main(["--data", "synthetic", "--out", str(out), "--table-only", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| supervised, all labels |" in text and text.endswith("b\n")


def test_markdown_states_means_spreads_and_gains():
    base = {"data": "fashion", "iters": "10", "budget": "{}", "preset": "{}", "pretrained": "w.pt", "commit": "abc",
            "torch": "2", "date": "d", "wall_s": "5", "threads": "1"}
    rows = [base | {"method": "supervised", "fraction": "1/16", "seed": "0", "miou": "10"},
            base | {"method": "supervised", "fraction": "1/16", "seed": "1", "miou": "12"},
            base | {"method": "fixmatch", "fraction": "1/16", "seed": "0", "miou": "14", "switch_mask_ratio": "0.5",
                    "diag_pl_acc_objects": "0.25"},
            base | {"method": "fixmatch", "fraction": "1/16", "seed": "1", "miou": "16", "switch_mask_ratio": "1"}]
    text = mt.markdown(rows, "fashion")
    assert "| supervised | 11.0 ± 1.0 |" in text
    assert "| fixmatch | 15.0 ± 1.0 | +4.0 |" in text and "25 %" in text and "mask_ratio 75 %" in text
