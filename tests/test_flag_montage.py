"""Issue 14: the flag step's montage explains itself: a legend band under the grid, outliers framed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cleanloop import cleaning
from cleanloop.cleaning import MONTAGE_BACKGROUND, MONTAGE_LEGEND_BACKGROUND, MONTAGE_MARK, render_montage
from cleanloop.steps import flag
from test_review import CONTRADICTED, FLAG, hand_made_oof

from conftest import make_cfg

CAPTIONS = ["dark -> mid\nq=0.050", "dark -> bright\nq=0.100 outlier", "mid -> bright\nq=0.100"]
LEGEND = ["Caption: given label -> predicted label; q = cleanlab label quality, lower = more likely mislabelled."]


def images(folder: Path) -> list[str]:
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 160, 30)]):
        path = folder / f"{i}.png"
        Image.new("RGB", (20, 20), colour).save(path)
        paths.append(str(path))
    return paths


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def is_colour(a: np.ndarray, colour) -> np.ndarray:
    return (a == np.asarray(colour)).all(axis=-1)


def test_legend_band_under_the_grid(tmp_path):
    paths = images(tmp_path)
    plain = pixels(render_montage(paths, CAPTIONS, tmp_path / "plain.png", columns=3, thumb=48))
    shown = pixels(render_montage(paths, CAPTIONS, tmp_path / "legend.png", columns=3, thumb=48, legend=LEGEND))
    grid_h, grid_w = plain.shape[:2]
    assert shown.shape[0] > grid_h  # taller than the grid alone
    assert (shown[:grid_h, :grid_w] == plain).all()  # the grid itself is unchanged
    band = shown[grid_h + 1:]
    assert is_colour(band, MONTAGE_LEGEND_BACKGROUND).mean() > 0.6  # a band, not more white page
    text = band.max(axis=-1) < 100  # dark glyphs on the light band
    assert text.sum() > 150 and text.any(axis=1).sum() >= 8  # a line of text, not a stray pixel


def test_outliers_are_framed_and_the_frame_is_in_the_legend(tmp_path):
    paths = images(tmp_path)
    plain = pixels(render_montage(paths, CAPTIONS, tmp_path / "plain.png", columns=3, thumb=48))
    marked = pixels(render_montage(paths, CAPTIONS, tmp_path / "marked.png", columns=3, thumb=48,
                                   marked=[False, True, False], mark_label="orange frame: outlier", legend=LEGEND))
    grid_h, grid_w = plain.shape[:2]
    cell_w = grid_w // 3
    grid = marked[:grid_h]
    for cell, framed in enumerate([False, True, False]):
        x0 = cell * cell_w
        edges = [grid[grid_h // 2, x0 + 2], grid[grid_h // 2, x0 + cell_w - 3], grid[2, x0 + cell_w // 2],
                 grid[grid_h - 3, x0 + cell_w // 2]]  # left, right, top and bottom of the cell's frame
        want = MONTAGE_MARK if framed else MONTAGE_BACKGROUND
        assert all(tuple(e) == want for e in edges), (cell, edges)
    in_grid = is_colour(grid, MONTAGE_MARK)
    assert in_grid[:, cell_w:2 * cell_w].sum() == in_grid.sum() > 0  # only the outlier's cell
    band = marked[grid_h + 1:]
    assert is_colour(band, MONTAGE_MARK).sum() > 20  # the legend's swatch of the frame
    assert (band.max(axis=-1) < 100).sum() > 150


def test_flag_step_draws_the_legend_and_frames_its_outliers(tmp_path, tiny_manifest, monkeypatch):
    calls = []
    real = cleaning.render_montage

    def spy(paths, captions, out_path, **kw):
        calls.append(kw)
        return real(paths, captions, out_path, **kw)

    monkeypatch.setattr(cleaning, "render_montage", spy)
    classes = ["bright", "dark", "mid"]
    oof = hand_made_oof(tiny_manifest, tmp_path / "oof.parquet", classes, CONTRADICTED)
    cfg = make_cfg(tmp_path, "data=manifest", f"data.manifest={tiny_manifest}", f"flag.oof={oof}", *FLAG)
    flag.run(cfg)
    out = Path(cfg.paths.out_dir) / "flag"
    table = pd.read_csv(out / "label_issues.csv", dtype=str, keep_default_na=False)
    shown = table[(table["is_label_issue"] == "True") | (table["is_outlier"] == "True")]
    outliers = (shown["is_outlier"] == "True").tolist()
    assert any(outliers) and not all(outliers)  # the case this test is about

    (kw,) = calls
    assert kw["marked"] == outliers  # the flagged rows' outlier column, in montage order
    assert "outlier" in kw["mark_label"] and "5%" in kw["mark_label"]  # flag.outlier.top_fraction=0.05
    legend = " ".join(kw["legend"])
    assert "given label -> label the model predicts" in legend
    assert "q = cleanlab label quality" in legend and "lower = more likely mislabelled" in legend
    assert f"of {len(shown)} flagged train rows" in legend

    montage = pixels(out / "mislabel_candidates.png")
    assert is_colour(montage[-5:], MONTAGE_LEGEND_BACKGROUND).mean() > 0.9  # the band at the bottom
    assert is_colour(montage, MONTAGE_MARK).sum() > 100  # frames (and the swatch) drawn
