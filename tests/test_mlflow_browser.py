"""Issue 14, in a real browser: after a demo cycle, a real `mlflow server` on 127.0.0.1 shows the answer.

Headless Debian Chromium through Playwright (as the review-page tests), against the store the demo
cycle of `conftest.demo_cycle` wrote. Screenshots go to test-artifacts/mlflow-ui/ (CI keeps them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import artifacts_dir

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the dev extra installs it
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1920, "height": 1080}


def wait_for_server(url: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"mlflow server at {url} did not answer in {timeout_s:.0f} s")


@pytest.fixture
def mlflow_ui(demo_cycle):
    """A real `mlflow server` over the demo cycle's store, on the port its printed links use."""
    root, r, port = demo_cycle
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((root / "outputs" / "demo" / "summary.json").read_text())
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", summary["mlflow"]["tracking_uri"],
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        wait_for_server(f"http://127.0.0.1:{port}/", proc)
        yield summary, r.stdout
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def grid_rows(page) -> tuple[list[str], list[str]]:
    """The runs table as (run names, the rest of each row), in table order: MLflow draws the pinned
    name column and the other columns as two lists of rows in the same order."""
    texts = [t.strip() for t in page.locator("[role=row]").all_inner_texts()]
    named = [i for i, t in enumerate(texts) if t and t.splitlines()[-1].endswith(" ago")]
    names = [texts[i].splitlines()[-2] for i in named]
    data = [t for t in texts[named[-1] + 1:] if t][: len(names)]
    return names, data


def compare_metric_rows(page) -> dict[str, list[str]]:
    """MLflow's compare-view metric table as drawn now: metric name -> the runs' values. It is two
    virtualised grids (names, values) whose cells share their `top` offset row by row."""
    return page.evaluate("""() => {
      const grids = Array.from(document.querySelectorAll('.ReactVirtualized__Grid'));
      const names = grids.find(g => g.innerText.includes('test/'));
      const values = grids[grids.indexOf(names) + 1];
      const byTop = {};
      for (const c of values.querySelectorAll('[style*="top"]')) (byTop[c.style.top] ||= []).push(c.innerText.trim());
      const out = {};
      for (const c of names.querySelectorAll('[style*="top"]')) out[c.innerText.trim()] = byTop[c.style.top] || [];
      return out;
    }""")


@pytest.mark.slow
@pytest.mark.xdist_group("demo_cycle")
@pytest.mark.skipif(sync_playwright is None or not Path(CHROMIUM).is_file(),
                    reason=f"needs Playwright (dev extra) and Chromium at {CHROMIUM} (CI installs it)")
def test_mlflow_ui_shows_the_answer_datasets_and_model(mlflow_ui):
    summary, stdout = mlflow_ui
    links = summary["mlflow"]
    shots = artifacts_dir("mlflow-ui")
    assert all("workflowType=machine_learning" in u for u in (links["runs_page"], links["compare_view"]))
    assert links["runs_page"] in stdout  # the link the user is given is the one opened here
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)

        # 1. the runs page, as linked: the cycle run and its headline delta, on the first screen
        page.goto(links["runs_page"])
        header = page.get_by_text("delta/balanced_accuracy", exact=True).first
        header.wait_for(timeout=120_000)
        page.get_by_text("cycle", exact=True).first.wait_for()
        page.screenshot(path=str(shots / "1-runs-page.png"))
        box = header.bounding_box()
        assert box and box["x"] + box["width"] <= VIEWPORT["width"] and box["y"] < VIEWPORT["height"]
        names, data = grid_rows(page)
        assert names == ["cycle"], names  # one parent run, its steps collapsed under it
        # the cycle run's cells hold the delta and its interval as logged (JS and Python print the same
        # shortest round-trip form of a float)
        lines = {line for t in page.locator("[role=row]").all_inner_texts() for line in t.split("\n")}
        ba = summary["delta"]["balanced_accuracy"]
        assert {repr(ba["delta"]), repr(ba["ci_low"]), repr(ba["ci_high"])} <= lines, sorted(lines)[:40]

        # 2. expanded: baseline and cleaned differ in the Dataset column; the cleaned run lists its model
        page.set_viewport_size({"width": 2560, "height": 1080})  # the screenshot shows every column beside MLflow's panel
        page.locator("[role=row]").filter(has_text="cycle").locator("button").first.click()
        page.get_by_text("train-cleaned", exact=True).first.wait_for()
        time.sleep(1)  # the data half of the rows renders right after the names
        page.screenshot(path=str(shots / "2-runs-expanded.png"))
        names, data = grid_rows(page)
        rows = dict(zip(names, data, strict=True))  # the latest run of each name (the table is newest first)
        base, clean = rows["train-baseline"], rows["train-cleaned"]
        dataset = lambda row: next(line for line in row.splitlines() if line.startswith(("baseline:", "cleaned:")))  # noqa: E731
        assert dataset(base).startswith("baseline:manifest.csv") and dataset(clean).startswith("cleaned:cleaned_manifest")
        assert dataset(base) != dataset(clean)
        assert "model" in clean.splitlines() and "model" in base.splitlines()  # the Models column

        # 3. the compare view, as linked: both runs' per-class recalls (MLflow's metric table scrolls)
        page.goto(links["compare_view"])
        page.get_by_text("Comparing 2 Runs", exact=False).wait_for(timeout=120_000)
        page.get_by_text("test/balanced_accuracy", exact=True).first.wait_for()
        classes = [row["class"] for row in summary["recall"]]
        seen = compare_metric_rows(page)
        grid = page.locator(".ReactVirtualized__Grid").filter(has_text="test/balanced_accuracy").first
        grid.scroll_into_view_if_needed()
        box = grid.bounding_box()
        page.mouse.move(box["x"] + box["width"] + 100, box["y"] + box["height"] / 2)  # over the values (they scroll both)
        for _ in range(12):
            if all(f"test/recall/{c}" in seen for c in classes):
                break
            page.mouse.wheel(0, 150)
            time.sleep(0.3)
            seen |= compare_metric_rows(page)
        page.screenshot(path=str(shots / "3-compare-recalls.png"))
        for c in classes:
            values = seen.get(f"test/recall/{c}")
            assert values is not None and len(values) == 2, (c, values)  # one value per run
            assert all(0.0 <= float(v) <= 1.0 for v in values), (c, values)
        browser.close()
