"""Issue #7 acceptance: a catalogue of bad inputs, each run through the real `cleanloop` console script
in a subprocess (CONTRACT §6).

Every refused input ends the step with exit 1 and exactly one stderr line
``cleanloop <step>: error: <message>`` naming the file, the row or column (or path) and what to
do; every accepted one exits 0. In both cases the user's input (the manifest and every file in its
folder: images, OOF parquets) is byte for byte unchanged. The property tests at the end check the
flag aggregates and the pruning rules over random inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cleanloop.cleaning import find_issues
from cleanloop.demo import CLASS_NAMES, build_demo
from cleanloop.flagcore import flag_tables
from cleanloop.images import image_problem
from cleanloop.oof_file import oof_frame, write_oof
from cleanloop.pruning import apply_pruning, read_decisions, select_pruned

from conftest import ForkedCli, run_cli, tiny_rows

CLASSES = ["bright", "dark", "mid"]  # the tiny data's class order (sorted train labels)
FIX_IMAGES = "fix or remove them, or set data.on_bad_image=skip to train without them"
FIX_OOF = "re-run `cleanloop oof`, or fix the file given as flag.oof"


# -- helpers -------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the manifest, its images, any OOF file beside them)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_manifest(df: pd.DataFrame, data: Path, name: str = "manifest.csv") -> Path:
    path = data / name
    df.to_csv(path, index=False)
    return path


def cli_args(step: str, manifest: Path, root: Path, *overrides: str) -> list[str]:
    """``cleanloop <step>`` on ``manifest``, every output (outputs, cache, MLflow store) under ``root``."""
    return [step, "data=manifest", f"data.manifest={manifest}", "data.num_workers=0", "data.pin_memory=false",
            f"paths.root_dir={root}", "tracking.experiment=test", *overrides]


def cli(step: str, manifest: Path, root: Path, *overrides: str, timeout: int = 300):
    """Run :func:`cli_args` to completion.

    One intra-op thread: on a CPU shared with other jobs, torch's two threads wait on each other
    (an epoch of the demo took 20 s instead of 1 s); the results are the same.
    """
    root.mkdir(parents=True, exist_ok=True)
    return run_cli(*cli_args(step, manifest, root, *overrides), cwd=root, timeout=timeout, env={"OMP_NUM_THREADS": "1"})


def refused(r, step: str) -> str:
    """Exit 1 and exactly one stderr line ``cleanloop <step>: error: ...``, no traceback; the message."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1, r.stderr[-3000:]
    prefix = f"cleanloop {step}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    return lines[0][len(prefix):]


def accepted(r) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and "error:" not in r.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the small accepted cases (creating a SQLite store costs ~5 s)."""
    return f"tracking.uri=sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


# -- 16: the demo with corrupted images and awkward class names, through `cleanloop cycle` ------
# First in the file: the fixture starts the skip cycle (the longest run here, ~35 s) in the
# background as soon as the demo copy is built, so that it runs beside the short cases (the
# machine's second core); the test that checks its outcome is the last in the file.

AWKWARD = {  # demo class -> a name with spaces, slashes, parentheses, "+", ":", "%", ... and non-ASCII letters
    "zero": "post-inflammatory hyperpigmentation (PIH)", "one": "nail/fungus", "two": "eczema: atopic",
    "three": "A+B", "four": "café au lait", "five": "Ünïcode", "six": "naevus, atypical",
    "seven": "50% hair-loss", "eight": "tinea [corporis]", "nine": "rash; drug #2",
}
# The MLflow key of each name, written out: what a dashboard filters on (CONTRACT §4).
AWKWARD_KEYS = {
    "post-inflammatory hyperpigmentation (PIH)": "post-inflammatory hyperpigmentation _PIH_",
    "nail/fungus": "nail/fungus", "eczema: atopic": "eczema_ atopic", "A+B": "A_B", "café au lait": "café au lait",
    "Ünïcode": "Ünïcode", "naevus, atypical": "naevus_ atypical", "50% hair-loss": "50_ hair-loss",
    "tinea [corporis]": "tinea _corporis_", "rash; drug #2": "rash_ drug _2",
}
CYCLE_FAST = ("oof.n_folds=2", "recipe.epochs=1", "compare.n_bootstrap=100", "compare.seeds=1", "review.screenshot=false")
SKIP_TEST = "test_cycle_on_corrupted_demo_skips_exactly_the_bad_images"


class Background:
    """A `cleanloop` run started now in a subprocess (output to files), waited for by a later test."""

    def __init__(self, args: list[str], cwd: Path):
        cwd.mkdir(parents=True, exist_ok=True)
        self.out, self.err = cwd / "stdout.txt", cwd / "stderr.txt"
        self.proc = ForkedCli(*args, cwd=cwd, env={"OMP_NUM_THREADS": "1"}, out=self.out, err=self.err)

    def wait(self, timeout: int = 600) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def awkward_demo(tmp_path_factory, request):
    """A fresh demo copy: 3% of its train+test images corrupted (seeded: zero bytes, text, truncated
    PNGs), the ten classes renamed to awkward names, written as ``awkward.csv`` beside the images;
    plus the ``data.on_bad_image=skip`` cycle on it, started in the background when that test is selected."""
    assert sorted(AWKWARD) == sorted(CLASS_NAMES)
    base = tmp_path_factory.mktemp("awkward")
    manifest = build_demo(base / "demo")
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    df["label"] = df["label"].map(AWKWARD)
    rng = np.random.default_rng(7)
    picked = np.sort(rng.choice(len(df), size=round(0.03 * len(df)), replace=False))
    kinds = rng.choice(["zero_byte", "text", "truncated"], size=len(picked))
    corrupted = {}
    for i, kind in zip(picked, kinds, strict=True):
        path = manifest.parent / df.at[i, "path"]
        if kind == "zero_byte":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("<html>404 not found</html>\n")
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        corrupted[df.at[i, "image_uuid"]] = str(kind)
    assert len(corrupted) == 54 and set(corrupted.values()) == {"zero_byte", "text", "truncated"}
    assert {"train", "test"} <= set(df.loc[picked, "split"])
    awkward = manifest.parent / "awkward.csv"
    df.to_csv(awkward, index=False)
    before = snapshot(manifest.parent)
    skip_root, skip_run = base / "skip", None
    if any(item.name == SKIP_TEST for item in request.session.items):
        skip_run = Background(cli_args("cycle", awkward, skip_root, "data.on_bad_image=skip", *CYCLE_FAST), skip_root)
    yield SimpleNamespace(manifest=awkward, corrupted=corrupted, before=before, base=base, skip_root=skip_root,
                          skip_run=skip_run)
    if skip_run is not None:
        skip_run.stop()


@pytest.mark.slow
def test_cycle_on_corrupted_demo_refuses_with_the_first_ten(awkward_demo):
    d = awkward_demo
    r = cli("cycle", d.manifest, d.base / "refuse", *CYCLE_FAST)
    msg = refused(r, "cycle")
    df = pd.read_csv(d.manifest, dtype=str, keep_default_na=False)
    bad = df[df["image_uuid"].isin(d.corrupted)]
    shown = []
    for uuid, rel in zip(bad["image_uuid"][:10], bad["path"][:10], strict=True):
        path = str(d.manifest.parent.resolve() / rel)
        reason = {"zero_byte": "empty file (0 bytes)", "text": "not an image: PIL cannot identify the file's format"
                  }.get(d.corrupted[uuid]) or image_problem(path)
        if d.corrupted[uuid] == "truncated":
            assert re.fullmatch(r"OSError: .*truncated.*|SyntaxError: broken PNG file.*", reason), reason
        shown.append(f"'{path}' ({reason})")
    assert msg == f"{d.manifest}: 54 image(s) cannot be decoded, first: {', '.join(shown)} and 44 more; {FIX_IMAGES}"
    assert snapshot(d.manifest.parent) == d.before


# -- 1-4, 6: the manifest itself -----------------------------------------------------------------


def _drop_label(df):
    return df.drop(columns=["label"])


def _duplicate_uuid(df):
    df.loc[3, "image_uuid"] = "dark-1"  # rows 1 and 3: CSV lines 3 and 5
    return df


def _unknown_split(df):
    df.loc[2, "split"] = "training"  # CSV line 4
    return df


def _no_train(df):
    df.loc[df["split"] == "train", "split"] = "val"
    return df


def _test_label_not_in_train(df):
    df.loc[7, "label"] = "purple"  # dark-7, a test row: CSV line 9
    return df


def _clashing_metric_keys(df):
    df["label"] = df["label"].replace({"dark": "A+B", "mid": "A:B"})
    return df


MANIFEST_CASES = {
    "missing_column": (_drop_label, "{m}: missing required column(s) label; a manifest needs image_uuid, path, label, "
                                    "split (found: image_uuid, path, split, group)"),
    "duplicate_uuid": (_duplicate_uuid, "{m}: duplicate image_uuid 'dark-1' at line 3, 5 (1 duplicate rows in all); "
                                        "image_uuid must be unique"),
    "unknown_split": (_unknown_split, "{m}: unknown split 'training' at line 4 (1 rows); "
                                      "split must be one of train, val, test"),
    "empty_train_split": (_no_train, "{m}: no rows with split == 'train' (column 'split' has only 'test', 'val'); "
                                     "cleanloop scores and retrains on the train split: set split=train on the rows "
                                     "to learn from"),
    "test_label_not_in_train": (_test_label_not_in_train,
                                "{m}: test label(s) 'purple' have no train rows, at line 9 (1 rows); a model cannot "
                                "learn them: add train rows or drop those test rows"),
    "metric_key_clash": (_clashing_metric_keys,
                         "{m}: classes 'A+B' and 'A:B' (column 'label') would share the MLflow metric key 'A_B', so "
                         "their per-class metrics would overwrite each other; rename one of them"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest_is_refused_in_one_line(tmp_path, case):
    mutate, expected = MANIFEST_CASES[case]
    data = tmp_path / "data"
    m = write_manifest(mutate(tiny_rows(data)), data)
    before = snapshot(data)
    r = cli("train", m, tmp_path / "run")
    assert refused(r, "train") == expected.format(m=m)
    assert snapshot(data) == before
    assert "epoch 1" not in r.stdout  # refused before any training


# -- 5: too few train rows for the folds ---------------------------------------------------------


def test_class_with_fewer_train_rows_than_folds(tmp_path):
    data = tmp_path / "data"
    df = tiny_rows(data)
    m = write_manifest(df[~df["image_uuid"].isin(["dark-0", "dark-1", "dark-2"])], data)  # dark: 3 train rows
    before = snapshot(data)
    r = cli("oof", m, tmp_path / "run")  # oof.n_folds=5, the default
    assert refused(r, "oof") == (f"{m}: class 'dark' has 3 train row(s), fewer than oof.n_folds=5 (1 such class(es)); "
                                 "add rows, merge the class, or lower oof.n_folds")
    assert snapshot(data) == before
    assert not list((tmp_path / "run").rglob("oof_probs.parquet"))


# -- 7: missing image files ----------------------------------------------------------------------


def test_missing_images_counted_and_first_ten_listed(tmp_path):
    data = tmp_path / "data"
    df = tiny_rows(data)
    m = write_manifest(df, data)
    gone = [data.resolve() / p for p in df["path"][:12]]  # dark-0..7, mid-0..3, in manifest order
    for p in gone:
        p.unlink()
    before = snapshot(data)
    r = cli("train", m, tmp_path / "run")
    msg = refused(r, "train")
    listed = ", ".join(repr(str(p)) for p in gone[:10])
    assert msg == f"{m}: 12 image file(s) not found, first: {listed} and 2 more; fix the paths or set data.image_root"
    assert str(gone[10]) not in msg and str(gone[11]) not in msg
    assert snapshot(data) == before


# -- 8-11: files that are not decodable images ---------------------------------------------------


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _text_as_jpg(path: Path) -> None:
    path.write_text("this is a text file, not a JPEG\n")


def _truncated_jpeg(path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path.with_suffix(".full"), format="JPEG", quality=95)
    data = path.with_suffix(".full").read_bytes()
    path.with_suffix(".full").unlink()
    path.write_bytes(data[: len(data) // 3])


def _bomb_png(path: Path) -> None:
    # 90 million 1-bit pixels: over PIL's Image.MAX_IMAGE_PIXELS (89.5 million), a few KB on disk.
    Image.new("1", (10_000, 9_000)).save(path, format="PNG")


BAD_IMAGES = {
    "zero_byte": (_zero_bytes, "bad.png", re.escape("empty file (0 bytes)")),
    "text_named_jpg": (_text_as_jpg, "bad.jpg", re.escape("not an image: PIL cannot identify the file's format")),
    "truncated_jpeg": (_truncated_jpeg, "bad.jpg",
                       r"OSError: (image file is truncated \(\d+ bytes not processed\)|Truncated File Read)"),
    "decompression_bomb": (_bomb_png, "bad.png", re.escape(
        f"decompression bomb: 10000x9000 pixels exceeds PIL's limit of {Image.MAX_IMAGE_PIXELS} "
        "(Image.MAX_IMAGE_PIXELS)")),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_undecodable_image_is_refused_with_its_path_and_reason(tmp_path, case):
    make, name, reason = BAD_IMAGES[case]
    data = tmp_path / "data"
    df = tiny_rows(data)
    make(data / "img" / name)
    assert (data / "img" / name).stat().st_size < 100_000
    df = pd.concat([df, pd.DataFrame([{"image_uuid": "bad", "path": f"img/{name}", "label": "dark",
                                       "split": "train", "group": "bad"}])], ignore_index=True)
    m = write_manifest(df, data)
    before = snapshot(data)
    t0 = time.time()
    r = cli("train", m, tmp_path / "run", timeout=120)
    msg = refused(r, "train")
    bad = re.escape(str(data.resolve() / "img" / name))
    assert re.fullmatch(rf"{re.escape(str(m))}: 1 image\(s\) cannot be decoded, first: '{bad}' \({reason}\); "
                        + re.escape(FIX_IMAGES), msg), msg
    assert time.time() - t0 < 60  # no hang on the bomb
    assert snapshot(data) == before


# -- 12-13: OOF parquets given to `flag` ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The tiny manifest and its images, shared by the OOF cases (which never write beside it)."""
    data = tmp_path_factory.mktemp("tiny") / "data"
    df = tiny_rows(data)
    return write_manifest(df, data), df


def _oof(path: Path, train: pd.DataFrame, probs: np.ndarray, classes=CLASSES) -> Path:
    return write_oof(path, oof_frame(train["image_uuid"], train["label"], np.zeros(len(train)), probs, classes),
                     classes=classes)


def _file_order(df: pd.DataFrame) -> pd.DataFrame:
    """The train rows in a shuffled order: a message's "row i" must be the file's row, not the manifest's."""
    train = df[df["split"] == "train"]
    return train.iloc[np.random.default_rng(1).permutation(len(train))].reset_index(drop=True)


def _other_manifest(train):
    other = pd.concat([train[~train["image_uuid"].isin(["dark-0", "dark-1"])],
                       pd.DataFrame([{"image_uuid": "other-0", "label": "dark"}])], ignore_index=True)
    return other, np.full((len(other), 3), 1 / 3), CLASSES


def _other_class_order(train):
    return train, np.full((len(train), 3), 1 / 3), ["mid", "dark", "bright"]


def _nan(train):
    probs = np.full((len(train), 3), 1 / 3)
    probs[5, 1] = np.nan
    return train, probs, CLASSES


def _negative(train):
    probs = np.full((len(train), 3), 1 / 3)
    probs[7, 0] = -0.2
    return train, probs, CLASSES


OOF_CASES = {
    "other_manifest": (_other_manifest, "{oof}: rows do not match the manifest's train split (2 train row(s) missing, "
                                        "e.g. ['dark-0', 'dark-1']; 1 unknown row(s), e.g. ['other-0']); the file was "
                                        "made from another manifest: re-run `cleanloop oof` on this manifest"),
    "other_class_order": (_other_class_order, "{oof}: class order ['mid', 'dark', 'bright'] differs from the "
                                              "manifest's ['bright', 'dark', 'mid']; re-run `cleanloop oof` on this "
                                              "manifest or set data.classes to the file's order"),
    "nan": (_nan, "{oof}: pred_probs has NaN in 1 row(s), first image_uuid '{u5}' (row 5); " + FIX_OOF),
    "negative": (_negative, "{oof}: pred_probs has negative values in 1 row(s), first image_uuid '{u7}' (row 7); "
                 + FIX_OOF),
}


@pytest.mark.parametrize("case", list(OOF_CASES))
def test_flag_refuses_a_bad_oof_file(tiny_data, tmp_path, case):
    manifest, df = tiny_data
    make, expected = OOF_CASES[case]
    train = _file_order(df)
    rows, probs, classes = make(train)
    oof = _oof(manifest.parent / f"oof-{case}.parquet", rows, probs, classes)
    before = snapshot(manifest.parent)
    r = cli("flag", manifest, tmp_path / "run", f"flag.oof={oof}")
    assert refused(r, "flag") == expected.format(oof=oof, u5=train["image_uuid"][5], u7=train["image_uuid"][7])
    assert snapshot(manifest.parent) == before
    assert not list((tmp_path / "run").rglob("label_issues.csv"))


def test_flag_normalises_rows_that_do_not_sum_to_one_with_a_warning(tiny_data, tmp_path, store):
    manifest, df = tiny_data
    train = _file_order(df)
    probs = np.random.default_rng(2).dirichlet(np.ones(3), size=len(train))
    scale = np.where(np.arange(len(train)) % 2 == 0, 0.5, 1.0)  # every other row sums to 0.5
    oof = _oof(manifest.parent / "oof-unnormalised.parquet", train, probs * scale[:, None])
    before = snapshot(manifest.parent)
    r = cli("flag", manifest, tmp_path / "run", f"flag.oof={oof}", store)
    accepted(r)
    assert (f"{oof}: 9 of 18 pred_probs row(s) do not sum to one (first image_uuid '{train['image_uuid'][0]}', "
            "file row 0, sum 0.5); each row normalised to sum to one before cleanlab") in r.stdout
    out = tmp_path / "run" / "outputs" / "manifest" / "flag"
    summary = json.loads((out / "flag_summary.json").read_text())
    assert summary["normalised_rows"] is True and summary["n_rows_normalised"] == 9
    issues = pd.read_csv(out / "label_issues.csv", dtype={"image_uuid": str})
    # label_quality (self_confidence) is the normalised probability of the given label, not half of it
    given = dict(zip(train["image_uuid"], probs[np.arange(len(train)), train["label"].map(CLASSES.index)],
                     strict=True))
    np.testing.assert_allclose(issues["label_quality"], issues["image_uuid"].map(given), rtol=1e-5)
    assert snapshot(manifest.parent) == before


# -- 14: a CSV with a UTF-8 BOM and Windows line ends --------------------------------------------


def test_csv_with_bom_and_crlf_is_accepted(tmp_path, store):
    data = tmp_path / "data"
    df = tiny_rows(data)
    m = data / "manifest.csv"
    m.write_bytes(b"\xef\xbb\xbf" + df.to_csv(index=False, lineterminator="\r\n").encode("utf-8"))
    assert m.read_bytes().startswith(b"\xef\xbb\xbfimage_uuid,") and b"\r\n" in m.read_bytes()
    issues = tmp_path / "label_issues.csv"  # one flagged row, as `cleanloop flag` writes them
    train = df[df["split"] == "train"]
    pd.DataFrame({"image_uuid": train["image_uuid"], "path": train["path"], "given_label": train["label"],
                  "predicted_label": train["label"], "label_quality": np.linspace(0.1, 0.9, len(train)),
                  "is_label_issue": train["image_uuid"] == "dark-0", "outlier_score": 0.0,
                  "is_outlier": False}).to_csv(issues, index=False)
    before = snapshot(data)
    r = cli("prune", m, tmp_path / "run", f"prune.issues={issues}", store)
    accepted(r)
    cleaned = pd.read_csv(tmp_path / "run" / "outputs" / "manifest" / "prune" / "cleaned_manifest.csv", dtype=str,
                          keep_default_na=False)
    assert list(cleaned.columns) == ["image_uuid", "path", "label", "split", "group"]  # no "\ufeffimage_uuid"
    assert len(cleaned) == 23 and "dark-0" not in set(cleaned["image_uuid"])
    assert set(cleaned["split"]) == {"train", "test"} and set(cleaned["label"]) == set(CLASSES)  # no "\r"
    assert snapshot(data) == before


# -- 15: image modes that must be converted, not rejected ----------------------------------------


def test_unusual_image_modes_and_exif_rotation_train(tmp_path, store):
    data = tmp_path / "data"
    df = tiny_rows(data)
    odd = []
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (12, 18, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("L").save(data / "img" / "gray.png")
    Image.fromarray(pixels).convert("RGBA").save(data / "img" / "rgba.png")
    Image.fromarray(pixels).convert("P").save(data / "img" / "palette.png")
    Image.fromarray(pixels).convert("CMYK").save(data / "img" / "cmyk.jpg", format="JPEG")
    Image.fromarray((rng.integers(0, 65535, (12, 18))).astype(np.uint16)).save(data / "img" / "i16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(data / "img" / "rotated.jpg", format="JPEG", exif=exif.tobytes())
    expected_modes = {"gray.png": "L", "rgba.png": "RGBA", "palette.png": "P", "cmyk.jpg": "CMYK", "i16.png": "I;16",
                      "rotated.jpg": "RGB"}
    for name, mode in expected_modes.items():
        with Image.open(data / "img" / name) as img:
            assert img.mode == mode, (name, img.mode)
        odd.append({"image_uuid": name.split(".")[0], "path": f"img/{name}", "label": CLASSES[len(odd) % 3],
                    "split": "train", "group": f"odd-{name}"})
    m = write_manifest(pd.concat([df, pd.DataFrame(odd)], ignore_index=True), data)
    before = snapshot(data)
    r = cli("train", m, tmp_path / "run", "recipe.epochs=1", "model=tiny", "model.image_size=16", "model.config.image_size=16",
            store)
    accepted(r)
    out = tmp_path / "run" / "outputs" / "manifest"
    assert "train baseline: 24 train rows, 0 val, 6 test" in r.stdout  # 18 + the 6 odd images: none dropped
    assert not (out / "skipped_images.csv").exists()
    assert json.loads((out / "train" / "baseline" / "metrics.json").read_text())["top1"] >= 0
    assert snapshot(data) == before


# -- 17: properties of the flag aggregates and of pruning ----------------------------------------


@st.composite
def labelled_probs(draw):
    k = draw(st.integers(2, 4))
    extra = draw(st.integers(0, 12))
    n = 3 * k + extra
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.concatenate([np.repeat(np.arange(k), 3), rng.integers(0, k, extra)]))
    concentration = draw(st.sampled_from([0.2, 1.0, 5.0]))
    probs = rng.dirichlet(np.full(k, concentration), size=n)
    return labels, probs, [f"c{i}" for i in range(k)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=labelled_probs(), filter_by=st.sampled_from(["prune_by_noise_rate", "prune_by_class", "both",
                                                         "confident_learning", "predicted_neq_given"]))
def test_flag_aggregates_sum_to_the_flagged_total(data, filter_by):
    labels, probs, classes = data
    found = find_issues(labels, probs, filter_by=filter_by)
    given_names = [classes[i] for i in labels]
    tables = flag_tables(found, classes=classes, image_uuids=[f"u{i}" for i in range(len(labels))],
                         paths=[f"p{i}" for i in range(len(labels))], given_labels=given_names)
    flagged = tables.issues[tables.issues["is_label_issue"]]
    per = tables.per_class.set_index("class")
    assert per["n_issues"].sum() == len(flagged) == int(found["is_label_issue"].sum())
    assert per["n_rows"].sum() == len(labels)
    assert per["n_issues"].to_dict() == {c: int((flagged["given_label"] == c).sum()) for c in classes}
    assert tables.confusions["count"].sum() == len(flagged)
    pairs = flagged.groupby(["given_label", "predicted_label"]).size().to_dict()
    assert {(g, p): int(n) for g, p, n in tables.confusions.itertuples(index=False)} == pairs


@st.composite
def flagged_manifest(draw):
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    split = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    manifest = pd.DataFrame({"image_uuid": [f"u{i}" for i in range(n)], "path": [f"{i}.png" for i in range(n)],
                             "label": rng.choice(classes, size=n), "split": split, "note": np.arange(n)})
    train = manifest[manifest["split"] == "train"]
    issues = pd.DataFrame({"image_uuid": train["image_uuid"], "given_label": train["label"],
                           "label_quality": rng.choice([0.1, 0.5, 0.9], size=len(train)),  # ties on purpose
                           "is_label_issue": rng.random(len(train)) < draw(st.floats(0, 1)),
                           "is_outlier": rng.random(len(train)) < 0.2})
    decisions = None
    if len(train) and draw(st.booleans()):
        chosen = train.sample(n=int(rng.integers(1, len(train) + 1)), random_state=int(rng.integers(1000)))
        decisions = pd.DataFrame({"image_uuid": chosen["image_uuid"],
                                  "decision": rng.choice(["keep", "drop", "relabel:b"], size=len(chosen))})
    fraction = draw(st.sampled_from([0.0, 0.1, 0.29, 0.5, 1.0]))
    return manifest, issues, decisions, fraction, classes


@settings(max_examples=50, deadline=None)
@given(case=flagged_manifest(), drop_label_issues=st.booleans(), drop_outliers=st.booleans())
def test_pruning_never_touches_val_test_and_respects_the_cap(case, drop_label_issues, drop_outliers):
    manifest, issues, decisions, fraction, classes = case
    train = manifest[manifest["split"] == "train"]
    n_train = train["label"].value_counts().to_dict()
    dec = None if decisions is None else read_decisions(decisions, classes=classes, known_uuids=train["image_uuid"])
    pruned = select_pruned(issues, drop_label_issues=drop_label_issues, drop_outliers=drop_outliers,
                           max_fraction_per_class=fraction, n_train_per_class=n_train, decisions=dec)
    cleaned = apply_pruning(manifest, pruned)
    assert set(pruned["image_uuid"]) <= set(train["image_uuid"])
    other = manifest[manifest["split"] != "train"].reset_index(drop=True)
    pd.testing.assert_frame_equal(cleaned[cleaned["split"] != "train"].reset_index(drop=True), other)
    auto = pruned[pruned["reason"] != "reviewer"]
    for c, k in auto["given_label"].value_counts().items():
        assert k <= math.floor(fraction * n_train[c] + 1e-9), (c, k, fraction, n_train[c])
    dropped = set(pruned.loc[pruned["new_label"].isna(), "image_uuid"])
    assert set(manifest["image_uuid"]) - set(cleaned["image_uuid"]) == dropped
    assert list(cleaned.columns) == list(manifest.columns)


# -- 16 (continued): the skip cycle started by the awkward_demo fixture --------------------------


@pytest.mark.slow
def test_cycle_on_corrupted_demo_skips_exactly_the_bad_images(awkward_demo, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    d = awkward_demo
    r = d.skip_run.wait()
    accepted(r)
    out = d.skip_root / "outputs" / "manifest"
    skipped = pd.read_csv(out / "skipped_images.csv", dtype=str, keep_default_na=False)
    assert sorted(skipped["image_uuid"]) == sorted(d.corrupted)
    assert skipped["reason"].str.len().min() > 0
    df = pd.read_csv(d.manifest, dtype=str, keep_default_na=False)
    good_train = set(df.loc[(df["split"] == "train") & ~df["image_uuid"].isin(d.corrupted), "image_uuid"])
    assert set(pd.read_parquet(out / "oof" / "oof_probs.parquet")["image_uuid"]) == good_train
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["classes"] == sorted(AWKWARD.values())
    assert set(json.loads((out / "train" / "baseline" / "metrics.json").read_text())["per_class"]) == set(AWKWARD_KEYS)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{d.skip_root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = "
                                                                 f"'{summary['mlflow']['cycle_run']}'")
    by_step = {(run.data.tags["cleanloop.step"], run.data.tags.get("cleanloop.role")): run for run in runs}
    baseline, flag_run = by_step[("train", "baseline")], by_step[("flag", None)]
    assert {k for k in baseline.data.metrics if k.startswith("test/recall/")} == {
        f"test/recall/{k}" for k in AWKWARD_KEYS.values()}
    assert {k for k in flag_run.data.metrics if k.startswith("flag/issue_rate/")} == {
        f"flag/issue_rate/{k}" for k in AWKWARD_KEYS.values()}
    changed = {name: key for name, key in AWKWARD_KEYS.items() if key != name}
    for run in (baseline, flag_run):
        assert "class_keys.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        local = client.download_artifacts(run.info.run_id, "class_keys.json", str(d.skip_root / run.info.run_id))
        assert json.loads(Path(local).read_text(encoding="utf-8")) == changed
    assert snapshot(d.manifest.parent) == d.before
