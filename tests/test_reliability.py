"""Part of the reliability issue: atomic writes survive a kill, secrets never reach the store."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanloop.oof_file import oof_frame, write_oof

from conftest import run_cli

WRITER = """
import sys, time
from cleanloop.io import write_atomic
target, started = sys.argv[1], sys.argv[2]
def writer(path):
    with open(path, "w") as f:
        for i in range(100000):
            f.write("x" * 1000 + "\\n")
            f.flush()
            if i == 50:
                open(started, "w").close()
            time.sleep(0.001)
write_atomic(target, writer)
"""


@pytest.mark.parametrize("old", ["old contents\n", None])
def test_a_killed_writer_leaves_the_old_file_or_none(tmp_path, old):
    target, started = tmp_path / "label_issues.csv", tmp_path / "started"
    if old is not None:
        target.write_text(old)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(started)])
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert started.exists(), "the writer never started"
    proc.kill()  # SIGKILL mid-write: no cleanup code runs
    proc.wait()
    if old is None:
        assert not target.exists()
    else:
        assert target.read_text() == old


def test_a_planted_hf_token_never_reaches_mlflow_or_outputs(tiny_manifest, tmp_path):
    token = "hf_PlantedSecret0123456789abcdef"
    m = pd.read_csv(tiny_manifest, dtype=str)
    t = m[m["split"] == "train"]
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=len(t))
    oof = write_oof(tmp_path / "oof.parquet", oof_frame(t["image_uuid"], t["label"], np.zeros(len(t)), probs,
                                                        ["bright", "dark", "mid"]), classes=["bright", "dark", "mid"])
    r = run_cli("flag", "data=manifest", f"data.manifest={tiny_manifest}", f"flag.oof={oof}",
                f"paths.root_dir={tmp_path}", cwd=tmp_path, env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    leaked = [p for p in Path(tmp_path).rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaked and token not in r.stdout + r.stderr


def _dirty_manifest(root: Path) -> tuple[Path, set[str]]:
    """Four classes of real PNGs plus three undecodable files in train: zero bytes, text named .jpg, a
    truncated JPEG; and grayscale / palette / RGBA / 16-bit / CMYK images that must be converted, not rejected."""
    from PIL import Image

    from conftest import write_png

    rows = []
    for c, v in (("dark", 20), ("mid", 110), ("bright", 200)):
        for i in range(8):
            u = f"{c}-{i}"
            write_png(root / "img" / f"{u}.png", v + i)
            rows.append({"image_uuid": u, "path": f"img/{u}.png", "label": c, "split": "test" if i >= 6 else "train"})
    modes = {"gray": "L", "pal": "P", "rgba": "RGBA", "i16": "I;16"}
    for name, mode in modes.items():
        Image.new(mode, (12, 9), 100).save(root / "img" / f"{name}.png")
        rows.append({"image_uuid": name, "path": f"img/{name}.png", "label": "mid", "split": "train"})
    Image.new("CMYK", (12, 9), (0, 0, 0, 50)).save(root / "img" / "cmyk.jpg")
    rows.append({"image_uuid": "cmyk", "path": "img/cmyk.jpg", "label": "dark", "split": "train"})
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "text.jpg").write_text("this is not a jpeg")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "img" / "full.jpg", quality=95)
    (root / "img" / "truncated.jpg").write_bytes((root / "img" / "full.jpg").read_bytes()[:300])
    for u in ("empty", "text", "truncated"):
        rows.append({"image_uuid": u, "path": f"img/{u}.{'png' if u == 'empty' else 'jpg'}", "label": "bright",
                     "split": "train"})
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, {"empty", "text", "truncated"}


def test_unreadable_images_stop_before_training_with_the_list(capsys, tmp_path):
    from cleanloop import cli

    manifest, bad = _dirty_manifest(tmp_path)
    before = manifest.read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "data=manifest", f"data.manifest={manifest}", "data.num_workers=0",
                  "model=tiny", "model.image_size=16", "model.config.image_size=16", f"paths.root_dir={tmp_path}"])
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(lines) == 1
    assert "3 image(s) cannot be decoded" in lines[0] and "data.on_bad_image=skip" in lines[0]
    for name in ("empty.png", "text.jpg", "truncated.jpg"):
        assert name in lines[0]
    for fine in ("gray.png", "pal.png", "rgba.png", "i16.png", "cmyk.jpg"):
        assert fine not in lines[0]  # converted, not rejected
    assert "epoch 1" not in out.out and manifest.read_bytes() == before


def test_decompression_bomb_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    from PIL import Image

    from cleanloop.images import image_problem

    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL's limit, scaled down for a tiny file
    reason = image_problem(str(tmp_path / "big.png"))
    assert reason is not None and ("DecompressionBomb" in reason or "decompression bomb" in reason)


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    from PIL import Image

    from cleanloop.images import load_image

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(str(tmp_path / "rot.jpg")).size == (20, 40)


def test_a_failed_fold_fails_the_step_and_publishes_no_oof(tiny_manifest, tmp_path, monkeypatch):
    """Fault injection: the second fold's training raises (as a CUDA error would). The step fails
    with that error, publishes no OOF file, leaves no OOF cache entry but the first fold's own entry
    (kept for a resume), and its MLflow run FAILED."""
    import mlflow

    from cleanloop.steps import oof

    from conftest import fail_nth_fit, make_cfg

    cfg = make_cfg(tmp_path, "data=manifest", f"data.manifest={tiny_manifest}", "data.num_workers=0",
                   "recipe.epochs=1", "oof.n_folds=2", "model=tiny", "model.image_size=16", "model.config.image_size=16",
                   "trainer.jobs=1")  # the folds in this process, where the patch below counts them
    calls = fail_nth_fit(monkeypatch, oof, 2, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        oof.run(cfg)
    assert len(calls) == 2
    assert not (tmp_path / "outputs" / "manifest" / "oof" / "oof_probs.parquet").exists()
    steps = tmp_path / ".cache" / "cleanloop" / "steps"
    assert not [p for p in (steps / "oof").iterdir() if p.is_dir()]  # nothing of the failed build is left
    done = [json.loads(m.read_text())["fold"] for m in (steps / "oof-fold").glob("[!.]*/cleanloop-entry.json")]
    assert done == [0]  # fold 0 kept for a resume: its own finished entry
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cleanloop.step` = 'oof'")
    assert runs["status"].tolist() == ["FAILED"]
