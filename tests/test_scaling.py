"""bench/scaling.py and docs/scaling.md: the projection's arithmetic, and a page that cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import scaling  # noqa: E402

REGENERATE = "docs/scaling.md is stale: regenerate it with `python bench/scaling.py > docs/scaling.md`"


@pytest.fixture(scope="module")
def real_page() -> str:
    """The page from the real B6 JSON, through the command line as the docs run it."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scaling.py")], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def table_rows(page: str, header_start: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the markdown table whose header line starts with ``header_start``."""
    lines = page.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_real_page_has_its_sources_and_tables(real_page):
    data = json.loads((REPO / scaling.DEFAULT_JSON).read_text())
    assert "bench/results/b6-nvidia-h200.json" in real_page
    assert data["commit"] in real_page and data["date"] in real_page and data["machine"] in real_page
    assert "python bench/scaling.py > docs/scaling.md" in real_page
    for heading in ("## Measured per-image costs", "## How the projection is computed", "## Projected wall time",
                    "## The image cache", "## Commands that scale it out"):
        assert heading in real_page
    costs = table_rows(real_page, "| part | images/s | GPU-s per image")
    assert costs["train step, batch 48"][-1] == "used"  # batch 64 unmeasured: the nearest below stands in
    projected = table_rows(real_page, "| layout | GPUs |")
    assert len(projected) == 5
    assert [k.split(" (")[0] for k in projected] == [
        "1 GPU", "2 GPUs, DDP in one job", "8 GPUs, DDP in one job",
        "SLURM array, 5 fold jobs x 1 GPU", "SLURM array, 5 fold jobs x 8 GPUs"]
    assert all("`oof.folds`" in k and "planned" not in k for k in list(projected)[3:])
    assert "trainer=ddp trainer.devices=8" in real_page and "hydra/launcher=slurm" in real_page
    assert "**assumed" in real_page  # test size and DDP efficiency are labelled as assumptions


def test_doc_equals_the_scripts_output(real_page):
    doc = (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert doc == real_page, REGENERATE


def tiny_json(tmp_path, *, train_batches=(64,)) -> str:
    rows = [{"part": "forward", "batch": 64, "images_per_s": 250.0},
            *({"part": "train", "batch": b, "images_per_s": 100.0} for b in train_batches),
            {"part": "predict (training.predict)", "batch": 64, "images_per_s": 200.0}]
    path = tmp_path / "b6-made-up.json"
    path.write_text(json.dumps({"date": "2000-01-02", "commit": "abc1234", "machine": "made-up GPU",
                                "rows": rows}))
    return str(path)


def made_up_page(tmp_path, capsys, *extra: str) -> str:
    argv = ["--json", tiny_json(tmp_path), "--compile-json", "", "--train-images", "36000",
            "--test-images", "3600", "--epochs", "10", "--batch", "64", "--folds", "5", "--repeats", "1",
            "--seeds", "1", "--flagged", "0.1", "--budget", "steps", "--ddp-efficiency", "0.9", *extra]
    assert scaling.main(argv) == 0
    return capsys.readouterr().out


def test_arithmetic_on_a_made_up_json(tmp_path, capsys):
    # 100 train images/s, 200 predict images/s, N = 36,000, T = 3,600, E = 10, k = 5:
    # fold = 10 * 36000 * 4/5 / 100 s (0.8 h) + 7200 / 200 s (0.01 h) = 0.81 h; OOF = 5 folds = 4.05 h;
    # baseline = 360000 / 100 s (1 h) + 3600 / 200 s (0.005 h) = 1.005 h; cleaned, budget=steps: the same.
    page = made_up_page(tmp_path, capsys)
    assert "made-up GPU; 2000-01-02, commit abc1234" in page
    rows = table_rows(page, "| layout | GPUs |")
    cols = ["GPUs", "oof", "oof_e", "pair", "pair_e", "total", "total_e", "gpu_h"]
    got = {k.split(" (")[0]: dict(zip(cols, v, strict=True)) for k, v in rows.items()}
    one = got["1 GPU"]
    assert (one["oof"], one["pair"], one["total"], one["total_e"], one["gpu_h"]) == (
        "4.05", "2.01", "6.06", "6.06", "6.06")
    s8 = 8 * 0.9 ** 3  # S(8) with e = 0.9 per doubling: 5.832
    assert got["8 GPUs, DDP in one job"]["total"] == f"{6.06 / 8:.2f}"
    assert got["8 GPUs, DDP in one job"]["total_e"] == f"{6.06 / s8:.2f}"
    assert got["2 GPUs, DDP in one job"]["total_e"] == f"{6.06 / 1.8:.2f}"
    assert got["SLURM array, 5 fold jobs x 1 GPU"]["total"] == f"{0.81 + 2.01:.2f}"  # OOF wall = one fold
    assert got["SLURM array, 5 fold jobs x 8 GPUs"]["total_e"] == f"{(0.81 + 2.01) / s8:.2f}"
    assert got["SLURM array, 5 fold jobs x 8 GPUs"]["gpu_h"] == f"{8 * 6.06 / s8:.2f}"
    costs = table_rows(page, "| part | images/s | GPU-s per image")
    assert costs["train step, batch 64"] == ["100.0", "0.01000", "used"]


def test_budget_epochs_and_val_rows_change_the_retrains():
    w = scaling.Workload(train_images=36000, test_images=3600, val_images=360, epochs=10, batch=64,
                         budget="epochs", folds=5, repeats=1, seeds=2, flagged=0.1)
    r = scaling.Rates(train=100.0, predict=200.0)
    h = scaling.project(w, r, scaling.Layout("1 GPU", 1, 1), 1.0)
    # val: 10 passes over 360 rows at 200/s = 18 s in the baseline; budget=epochs trains 0.9 of its images
    assert h["baseline"] == pytest.approx(1.005 + 18 / 3600)
    assert h["cleaned"] == pytest.approx(0.9 + 0.005 + 18 / 3600)
    assert h["total"] == pytest.approx(4.05 + 2 * (h["baseline"] + h["cleaned"]))
    # budget=steps: the baseline's images over 0.9 of the rows, i.e. 10 / 0.9 epochs of validation
    steps = scaling.project(scaling.Workload(**{**w.__dict__, "budget": "steps"}), r,
                            scaling.Layout("1 GPU", 1, 1), 1.0)
    assert steps["cleaned"] == pytest.approx(1.005 + 20 / 3600)


def test_unmeasured_batch_takes_the_nearest_below(tmp_path):
    path = tiny_json(tmp_path, train_batches=(32, 48))
    rows = scaling.rows_of(json.loads((tmp_path / "b6-made-up.json").read_text()), "train")
    assert path.endswith("b6-made-up.json")
    assert scaling.pick_batch(rows, 64)[0]["batch"] == 48
    assert scaling.pick_batch(rows, 48)[0]["batch"] == 48
    assert scaling.pick_batch(rows, 16)[0]["batch"] == 32
    assert scaling.speedup(1, 0.9) == 1 and scaling.speedup(2, 0.9) == pytest.approx(1.8)
