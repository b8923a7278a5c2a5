"""B7: does cleanloop find and remove injected label noise, and does cleaning help? Against a peer.

Every case is scikit-learn's digits (``load_digits``, installed with the project) at one rendering,
with one kind and rate of label noise injected into the train split, plus a few garbage images
(text pages and photo crops, as in the demo) with random labels; test labels stay clean, rows are
grouped by 3 within a split (patient-like groups). Every case is seeded and reproducible: the
split, groups and renderings use seed 0, the noise a seed derived from the case name.

Side by side on each case:

- **cleanloop**: the case is written as PNGs + ``manifest.csv`` + ``ground_truth.csv`` into a
  temporary folder and the real steps run in-process on a composed config (as tests/conftest.py
  composes it): ``steps.oof.run``, ``flag.run``, ``prune.run``, then ``train.run`` with
  role=baseline and role=cleaned for each seed (``recipe.seed``). Flags are what cleanloop marks
  (``is_label_issue`` or ``is_outlier``, what prune drops).
- **peer** (CleanLearning-style): scikit-learn ``LogisticRegression`` on the same PNGs read back
  (grayscale, flattened, scaled to [0, 1]); out-of-fold probabilities by ``cross_val_predict``
  over ``StratifiedGroupKFold`` with cleanloop's number of folds; ``cleanlab.filter.find_label_issues``
  with its defaults; the flagged rows pruned and the model refitted. Baseline = fit on all train
  rows. Its seeds shuffle the folds (lbfgs itself is deterministic, so its baseline does not vary).

Metrics for both: flag precision / recall / F1 against the injected truth (a flagged garbage row
is a true issue), true issues among the 100 lowest label-quality rows, and the test balanced
accuracy of baseline and cleaned with the gain's mean over seeds and its 95% t-interval over the
per-seed paired differences.

    python bench/efficacy.py                                 # the default grid (see DEFAULT_CASES)
    python bench/efficacy.py --quick                         # 3 small cases, 2 seeds, 5 epochs: a smoke test
    python bench/efficacy.py --cases up24-lookalike-20,native8-uniform-05
    python bench/efficacy.py --cleanloop "model=tiny recipe.epochs=20" --out bench/results/b7-candidate-x.json
    python bench/efficacy.py --from-json bench/results/b7-candidate-x.json   # its table again, nothing run

``make bench-efficacy`` runs it through bench/run.py (``--parts b7``), which also rewrites section
B7 of bench/RESULTS.md; run this script directly to try a model or recipe without touching it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "b7-efficacy.json"
QUICK_OUT = HERE / "results" / "b7-efficacy-quick.json"

RENDERINGS = {  # name -> what it is (the PNG side in pixels is in RENDER_SIZE)
    "native8": "the 8x8 digits as they come (16 ink levels scaled to 0-255)",
    "up24": "upscaled to 24 px, bicubic",
    "shiftblur": "24 px bicubic, then a random sub-pixel shift (up to 3 px = 1 native pixel each way) and a "
                 "Gaussian blur (sigma 0.6-1.4), seeded per image",
}
RENDER_SIZE = {"native8": 8, "up24": 24, "shiftblur": 24}
KINDS = {
    "uniform": "each class loses the rate to the nine others evenly",
    "lookalike": "cleanloop.demo.noise_matrix: 3 classes lose 35% (90% of it to one look-alike), the rest share "
                 "the remainder 2:1 between two classes (fewer heavy classes where the rate cannot carry 3)",
    "systematic": "one class loses 35% of its labels to one other class; the other classes lose the remainder "
                  "evenly, so that the mean per-class rate is the case's rate",
}
RATES = (5, 10, 20, 30)
# Six cases, so that the suite fits in 20 minutes on 2 cores with the default model and recipe
# (measured 14.8 min, two cases at a time, 3.5-6 minutes a case: 5 OOF folds + 6 trainings): each
# rendering and each noise kind once at 20% (a Latin diagonal: native8 x uniform, up24 x look-alike,
# shiftblur x systematic; the other pairings via --cases), and the rate 5/10/20/30% on the middle
# one. `--cases all` is the whole 36-case cross product.
DEFAULT_CASES = ["up24-lookalike-20", "native8-uniform-20", "shiftblur-systematic-20",
                 "up24-lookalike-05", "up24-lookalike-10", "up24-lookalike-30"]
QUICK_CASES = ["native8-uniform-20", "up24-lookalike-20", "shiftblur-systematic-20"]
# --quick: smaller data and recipe (before the user's --cleanloop overrides, which win).
QUICK_OVERRIDES = ["recipe.epochs=5", "oof.n_folds=3"]
QUICK_ROWS = 900
N_GARBAGE = 12
GROUP_SIZE = 3
TEST_FRACTION = 0.25
TOP_N = 100
HEAVY_RATE = 0.35
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CASE_RE = re.compile(r"^(?P<rendering>[a-z0-9]+)-(?P<kind>[a-z]+)-(?P<rate>\d{2})$")
# Before the user's overrides: the manifest data group defaults to 8 workers and pinned memory (GPU
# boxes); on a 2-core CPU the demo's settings are the fast ones.
BASE_OVERRIDES = ["data.num_workers=0", "data.pin_memory=false", "data.memory_cache_mb=256"]

log = logging.getLogger("b7")


# ---------------------------------------------------------------------------------------------
# cases


def parse_case(name: str) -> dict:
    m = CASE_RE.match(name)
    if not m or m["rendering"] not in RENDERINGS or m["kind"] not in KINDS or not 0 < int(m["rate"]) < 50:
        raise SystemExit(f"--cases: {name!r} is not RENDERING-KIND-RATE with RENDERING in {', '.join(RENDERINGS)}, "
                         f"KIND in {', '.join(KINDS)} and RATE two digits (05, 10, 20, 30)")
    return {"case": name, "rendering": m["rendering"], "kind": m["kind"], "rate": int(m["rate"]) / 100}


def expand_cases(spec: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "default":
            names += DEFAULT_CASES
        elif part == "quick":
            names += QUICK_CASES
        elif part == "all":
            names += [f"{r}-{k}-{x:02d}" for r in RENDERINGS for k in KINDS for x in RATES]
        else:
            names.append(part)
    for n in names:
        parse_case(n)
    return list(dict.fromkeys(names))


def case_seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 2**31


def lookalike_matrix(k: int, rate: float, seed: int) -> tuple[np.ndarray, int]:
    """cleanloop.demo.noise_matrix with as many heavy classes (up to 3) as the rate can carry."""
    from cleanloop.demo import noise_matrix

    for n_heavy in (3, 2, 1, 0):
        try:
            return noise_matrix(k, rate, seed=seed, n_heavy=n_heavy, heavy_rate=HEAVY_RATE), n_heavy
        except ValueError:
            continue
    raise ValueError(f"no look-alike noise matrix at rate {rate}")


def uniform_matrix(k: int, rate: float) -> np.ndarray:
    nm = np.full((k, k), rate / (k - 1))
    np.fill_diagonal(nm, 1.0 - rate)
    return nm


def systematic_matrix(k: int, rate: float, seed: int) -> tuple[np.ndarray, tuple[int, int]]:
    rng = np.random.default_rng(seed)
    src, dst = (int(x) for x in rng.choice(k, size=2, replace=False))
    light = (k * rate - HEAVY_RATE) / (k - 1)
    if not 0.0 <= light < 1.0:
        raise SystemExit(f"systematic noise at rate {rate}: one class at {HEAVY_RATE} already exceeds it")
    nm = uniform_matrix(k, light)
    nm[:, src] = 0.0
    nm[src, src], nm[dst, src] = 1.0 - HEAVY_RATE, HEAVY_RATE
    return nm, (src, dst)


def render(images: np.ndarray, rendering: str, seed: int = 0) -> list[np.ndarray]:
    """uint8 grayscale arrays of the digits (8x8 ink levels 0..16) at one rendering."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter, shift

    native = [(img * (255.0 / 16.0)).astype(np.uint8) for img in images]
    if rendering == "native8":
        return native
    size = RENDER_SIZE[rendering]
    up = [np.asarray(Image.fromarray(a, mode="L").resize((size, size), Image.Resampling.BICUBIC)) for a in native]
    if rendering == "up24":
        return up
    rng = np.random.default_rng(zlib.crc32(rendering.encode()) + seed)
    out = []
    for a in up:
        moved = shift(a.astype(np.float32), rng.uniform(-3.0, 3.0, size=2), order=1, mode="constant", cval=0.0)
        out.append(np.clip(gaussian_filter(moved, sigma=rng.uniform(0.6, 1.4)), 0, 255).round().astype(np.uint8))
    return out


def build_case(case: dict, out_dir: Path, *, n_rows: int | None = None, seed: int = 0) -> dict:
    """Write images/, manifest.csv and ground_truth.csv for one case; return its description."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images
    from sklearn.model_selection import train_test_split

    from cleanloop.demo import _photo_crop, _text_page, flip_labels

    digits = load_digits()
    idx = np.arange(len(digits.target))
    if n_rows is not None and n_rows < len(idx):
        idx, _ = train_test_split(idx, train_size=n_rows, stratify=digits.target, random_state=seed)
        idx = np.sort(idx)
    target = digits.target[idx]
    k = len(CLASS_NAMES)
    tr, te = train_test_split(np.arange(len(idx)), test_size=TEST_FRACTION, stratify=target, random_state=seed)
    noise_seed = case_seed(case["case"])
    detail: dict = {}
    if case["kind"] == "uniform":
        nm = uniform_matrix(k, case["rate"])
    elif case["kind"] == "lookalike":
        nm, detail["n_heavy"] = lookalike_matrix(k, case["rate"], noise_seed)
    else:
        nm, pair = systematic_matrix(k, case["rate"], noise_seed)
        detail["systematic"] = f"{CLASS_NAMES[pair[0]]} -> {CLASS_NAMES[pair[1]]}"
    given = target.copy()
    given[tr] = flip_labels(target[tr], nm, seed=noise_seed)

    rng = np.random.default_rng(seed)
    group = np.empty(len(idx), dtype=object)
    for tag, rows in (("tr", tr), ("te", te)):
        for j, i in enumerate(rng.permutation(rows)):
            group[i] = f"{tag}-g{j // GROUP_SIZE:04d}"
    split = np.where(np.isin(np.arange(len(idx)), te), "test", "train")
    uuids = [f"digit-{i:05d}" for i in idx]

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for uuid, arr in zip(uuids, render(digits.images[idx], case["rendering"], seed), strict=True):
        Image.fromarray(arr, mode="L").save(images / f"{uuid}.png")
    rows = pd.DataFrame({"image_uuid": uuids, "path": [f"images/{u}.png" for u in uuids],
                         "label": np.array(CLASS_NAMES)[given], "split": split, "group": group})
    truth = pd.DataFrame({"image_uuid": uuids, "true_label": np.array(CLASS_NAMES)[target],
                          "is_noisy": given != target, "is_garbage": False})
    grng = np.random.default_rng(noise_seed + 1)
    photos = list(load_sample_images().images)
    size = RENDER_SIZE[case["rendering"]]
    g_rows, g_truth = [], []
    for j in range(N_GARBAGE):
        uuid = f"garbage-{j:03d}"
        img = _text_page(grng, size) if j % 2 == 0 else _photo_crop(grng, photos, size)
        img.save(images / f"{uuid}.png")
        g_rows.append({"image_uuid": uuid, "path": f"images/{uuid}.png",
                       "label": CLASS_NAMES[int(grng.integers(k))], "split": "train", "group": f"garbage-g{j:03d}"})
        g_truth.append({"image_uuid": uuid, "true_label": "", "is_noisy": False, "is_garbage": True})
    rows = pd.concat([rows, pd.DataFrame(g_rows)], ignore_index=True)
    truth = pd.concat([truth, pd.DataFrame(g_truth)], ignore_index=True)
    rows.to_csv(out_dir / "manifest.csv", index=False)
    truth.to_csv(out_dir / "ground_truth.csv", index=False)
    n_train_digits = len(tr)
    n_noisy = int(truth["is_noisy"].sum())
    return {**case, **detail, "n_train": n_train_digits + N_GARBAGE, "n_test": len(te), "n_noisy": n_noisy,
            "n_garbage": N_GARBAGE, "noise_rate_actual": n_noisy / n_train_digits, "noise_seed": noise_seed,
            "image_size": size}


def load_pixels(case_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The manifest and its PNGs read back: grayscale, flattened, scaled to [0, 1]."""
    from PIL import Image

    rows = pd.read_csv(case_dir / "manifest.csv", dtype=str, keep_default_na=False)
    x = np.stack([np.asarray(Image.open(case_dir / p).convert("L"), dtype=np.float32).ravel() / 255.0
                  for p in rows["path"]])
    return rows, x


# ---------------------------------------------------------------------------------------------
# metrics


def flag_metrics(flagged: np.ndarray, bad: np.ndarray) -> dict:
    flagged, bad = np.asarray(flagged, bool), np.asarray(bad, bool)
    tp = int((flagged & bad).sum())
    p = tp / flagged.sum() if flagged.sum() else 0.0
    r = tp / bad.sum() if bad.sum() else 0.0
    return {"precision": float(p), "recall": float(r), "f1": float(2 * p * r / (p + r)) if p + r else 0.0,
            "n_flagged": int(flagged.sum()), "n_bad": int(bad.sum()), "true_positives": tp}


def top_true(quality: np.ndarray, bad: np.ndarray, n: int = TOP_N) -> int:
    """True issues among the ``n`` lowest label-quality rows (stable order on ties)."""
    order = np.argsort(np.asarray(quality, float), kind="stable")[:n]
    return int(np.asarray(bad, bool)[order].sum())


def gain_interval(baseline: list[float], cleaned: list[float]) -> dict:
    """Mean of the per-seed paired gains (cleaned - baseline) with its 95% t-interval over seeds."""
    from scipy import stats

    d = np.asarray(cleaned, float) - np.asarray(baseline, float)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"), "n": len(d)}
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(d)}


def truth_arrays(case_dir: Path, uuids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bad, true label or '', is_garbage) in the order of ``uuids``."""
    t = pd.read_csv(case_dir / "ground_truth.csv", dtype=str, keep_default_na=False).set_index("image_uuid")
    t = t.reindex(list(uuids))
    noisy, garbage = (t[c].str.lower().isin(["true", "1"]).to_numpy() for c in ("is_noisy", "is_garbage"))
    return noisy | garbage, t["true_label"].to_numpy(), garbage


# ---------------------------------------------------------------------------------------------
# the peer


def run_peer(case_dir: Path, *, n_folds: int, seeds: list[int]) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    rows, x = load_pixels(case_dir)
    classes = sorted(set(rows.loc[rows["split"] == "train", "label"]))
    index = {c: i for i, c in enumerate(classes)}
    tr, te = (rows["split"] == "train").to_numpy(), (rows["split"] == "test").to_numpy()
    y = rows.loc[tr, "label"].map(index).to_numpy()
    y_test = rows.loc[te, "label"].map(index).to_numpy()
    groups = rows.loc[tr, "group"].to_numpy()
    bad, true_label, garbage = truth_arrays(case_dir, rows.loc[tr, "image_uuid"])
    per_seed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for s in seeds:
            lr = LogisticRegression(max_iter=1000, random_state=s)
            cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=s)
            probs = cross_val_predict(lr, x[tr], y, groups=groups, cv=cv, method="predict_proba")
            # cleanlab's defaults; n_jobs=1 (no pool: its pool needs fork, and each job has one core)
            issues = find_label_issues(y, probs, n_jobs=1)
            quality = get_label_quality_scores(y, probs)
            base = clone(lr).fit(x[tr], y)
            cleaned = clone(lr).fit(x[tr][~issues], y[~issues])
            oracle = clone(lr).fit(x[tr][~bad], y[~bad])  # the ceiling: every truly bad row removed
            pred = np.asarray(classes)[probs.argmax(1)]
            per_seed.append({
                "seed": s, "flags": flag_metrics(issues, bad), "top100_true": top_true(quality, bad),
                "oof_acc_true": float((pred[~garbage] == true_label[~garbage]).mean()),
                "baseline_ba": float(balanced_accuracy_score(y_test, base.predict(x[te]))),
                "cleaned_ba": float(balanced_accuracy_score(y_test, cleaned.predict(x[te]))),
                "oracle_ba": float(balanced_accuracy_score(y_test, oracle.predict(x[te]))),
            })
    first = per_seed[0]
    return {"flags": first["flags"], "top100_true": first["top100_true"], "oof_acc_true": first["oof_acc_true"],
            "baseline_ba": [r["baseline_ba"] for r in per_seed], "cleaned_ba": [r["cleaned_ba"] for r in per_seed],
            "gain": gain_interval([r["baseline_ba"] for r in per_seed], [r["cleaned_ba"] for r in per_seed]),
            "oracle_ba": [r["oracle_ba"] for r in per_seed], "per_seed": per_seed, "model": "LogisticRegression(max_iter=1000) on raw pixels",
            "n_folds": n_folds}


# ---------------------------------------------------------------------------------------------
# cleanloop


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from cleanloop.config import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def case_overrides(case: str, case_dir: Path, work: Path, user: list[str]) -> list[str]:
    """The case's config: everything (outputs, step cache, MLflow store) in the case's own folder ``work``,
    so that cases can run in parallel processes; then the bench's data settings, then the user's."""
    return [f"paths.root_dir={work}", "data=manifest", f"data.manifest={case_dir / 'manifest.csv'}",
            f"data.name={case}", f"paths.out_dir={work / 'out'}", f"paths.cache_dir={work / 'cache'}",
            f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tracking.artifact_root={work / 'artifacts'}",
            "tracking.experiment=b7-efficacy", *BASE_OVERRIDES, *user]


def run_cleanloop(case: str, case_dir: Path, work: Path, *, user: list[str], seeds: list[int]) -> dict:
    from cleanloop.steps import flag, oof, prune, train

    base = case_overrides(case, case_dir, work, user)
    cfg = compose_cfg(base)
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    oof_info = oof.run(cfg)
    secs["oof"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    flag_info = flag.run(cfg)
    secs["flag"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prune_info = prune.run(cfg)
    secs["prune"] = time.perf_counter() - t0

    issues = pd.read_csv(Path(cfg.paths.out_dir) / "flag" / "label_issues.csv", dtype={"image_uuid": str},
                         keep_default_na=False)
    as_bool = lambda s: s.astype(str).str.lower().isin(["true", "1"]).to_numpy()  # noqa: E731
    flagged = as_bool(issues["is_label_issue"]) | as_bool(issues["is_outlier"])
    bad, true_label, garbage = truth_arrays(case_dir, issues["image_uuid"])
    pred = issues["predicted_label"].to_numpy()

    # The oracle: the same recipe on the train rows less every truly bad one (noisy or garbage), through
    # the same `train role=cleaned` path: the ceiling a perfect flagger would reach.
    manifest = pd.read_csv(case_dir / "manifest.csv", dtype=str, keep_default_na=False)
    bad_all, _, _ = truth_arrays(case_dir, manifest["image_uuid"])
    oracle_path = case_dir / "oracle_manifest.csv"
    manifest[~((manifest["split"] == "train").to_numpy() & bad_all)].to_csv(oracle_path, index=False)
    baseline, cleaned, oracle, train_s = [], [], [], []
    for s in seeds:
        for role, out, extra in (("baseline", baseline, []), ("cleaned", cleaned, []),
                                 ("cleaned", oracle, [f"cleaned_manifest={oracle_path}"])):
            t0 = time.perf_counter()
            out.append(float(train.run(compose_cfg([*base, f"recipe.seed={s}", f"role={role}", *extra]))[
                "balanced_accuracy"]))
            train_s.append(time.perf_counter() - t0)
    secs["train"] = float(sum(train_s))
    secs["train_each"] = float(np.mean(train_s))
    return {
        "flags": flag_metrics(flagged, bad),
        "label_issues_only": flag_metrics(as_bool(issues["is_label_issue"]), bad),
        "top100_true": top_true(pd.to_numeric(issues["label_quality"]).to_numpy(), bad),
        "oof_acc_true": float((pred[~garbage] == true_label[~garbage]).mean()),
        "oof_top1_given": float(oof_info.get("top1", float("nan"))),
        "self_scored": flag_info.get("ground_truth"),  # flag.run's own score against ground_truth.csv
        "n_pruned": int(prune_info["n_pruned"]),
        "baseline_ba": baseline, "cleaned_ba": cleaned, "gain": gain_interval(baseline, cleaned),
        "oracle_ba": oracle,
        "seconds": secs,
        "config": {"model": str(cfg.model.name), "epochs": int(cfg.recipe.epochs), "n_folds": int(cfg.oof.n_folds),
                   "oof": str(cfg.oof.method), "filter_by": str(cfg.flag.filter_by)},
    }


# ---------------------------------------------------------------------------------------------
# report


def misses(r: dict) -> list[str]:
    """Cases where cleanloop's F1 is below the peer's, or (at 20% noise) its gain is below both the
    peer's and +5 points; each with the figures that say where to look."""
    lines = []
    for c in r["cases"]:
        cl, pe = c["cleanloop"], c["peer"]
        why = []
        if cl["flags"]["f1"] < pe["flags"]["f1"]:
            why.append(f"flag F1 {cl['flags']['f1']:.3f} < peer {pe['flags']['f1']:.3f}")
        if abs(c["rate"] - 0.20) < 1e-9 and cl["gain"]["mean"] < pe["gain"]["mean"] and cl["gain"]["mean"] < 0.05:
            why.append(f"gain {100 * cl['gain']['mean']:+.1f} pts < peer {100 * pe['gain']['mean']:+.1f} and < +5")
        if why:
            lines.append(f"- MISS `{c['case']}`: {'; '.join(why)}. {explain(c)}")
    return lines


def headroom(x: dict) -> tuple[float, float, float]:
    """(baseline BA, oracle BA, share of the oracle's gain that cleaning recovered) as means over seeds."""
    base, clean = float(np.mean(x["baseline_ba"])), float(np.mean(x["cleaned_ba"]))
    oracle = float(np.mean(x["oracle_ba"])) if x.get("oracle_ba") else float("nan")
    room = oracle - base
    return base, oracle, (clean - base) / room if room > 0 else float("nan")


def explain(c: dict) -> str:
    """Why a case missed, from its own figures: the flags, the baselines and the clean-label ceiling."""
    cl, pe = c["cleanloop"], c["peer"]
    b_cl, o_cl, share_cl = headroom(cl)
    b_pe, o_pe, share_pe = headroom(pe)
    parts = [f"Held-out accuracy against the true labels: cleanloop {cl['oof_acc_true']:.3f}, peer "
             f"{pe['oof_acc_true']:.3f}; flagged {cl['flags']['n_flagged']} (peer {pe['flags']['n_flagged']}) of "
             f"{cl['flags']['n_bad']} true issues."]
    if np.isfinite(o_cl):
        parts.append(f"Headroom: cleanloop's baseline {b_cl:.3f} against its clean-label ceiling {o_cl:.3f} "
                     f"({100 * (o_cl - b_cl):+.1f} pts available, {_share(share_cl)} recovered); the peer's "
                     f"{b_pe:.3f} against {o_pe:.3f} ({100 * (o_pe - b_pe):+.1f} pts, {_share(share_pe)} recovered).")
        if b_cl >= float(np.mean(pe["cleaned_ba"])):
            parts.append(f"cleanloop's *baseline* is already above the peer's cleaned model "
                         f"({float(np.mean(pe['cleaned_ba'])):.3f}): the stronger learner resists the noise, "
                         "so less is left for cleaning to win.")
    return " ".join(parts)


def _share(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(HERE.parent)) if p.is_relative_to(HERE.parent) else str(p)


def _ci(g: dict) -> str:
    if g["n"] < 2:
        return f"{100 * g['mean']:+.1f}"
    return f"{100 * g['mean']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"


def table(r: dict) -> str:
    lines = ["| case | who | flag P | flag R | flag F1 | flagged / true | top-100 true | baseline BA | cleaned BA | "
             "gain pts [95% CI] | oracle BA | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["cases"]:
        for who in ("cleanloop", "peer"):
            x = c[who]
            f = x["flags"]
            secs = c["seconds"]["cleanloop" if who == "cleanloop" else "peer"]
            lines.append(
                f"| {c['case'] if who == 'cleanloop' else ''} | {who} | {f['precision']:.3f} | {f['recall']:.3f} | "
                f"{f['f1']:.3f} | {f['n_flagged']} / {f['n_bad']} | {x['top100_true']} | {np.mean(x['baseline_ba']):.3f} | "
                f"{np.mean(x['cleaned_ba']):.3f} | {_ci(x['gain'])} | "
                f"{np.mean(x['oracle_ba']) if x.get('oracle_ba') else float('nan'):.3f} | {secs:.0f} |")
    return "\n".join(lines)


def section(r: dict) -> str:
    m = r["machine"]
    cfg = r["cases"][0]["cleanloop"]["config"] if r["cases"] else {}
    seeds = ", ".join(map(str, r["seeds"]))
    miss = misses(r)
    per_case = [c["seconds"]["total"] for c in r["cases"]]
    subset = f" (a stratified {r['n_rows']} of the 1,797)" if r.get("n_rows") else ""
    return "\n".join([
        "## B7: efficacy, cleanloop against a CleanLearning-style peer on noisy digits",
        "",
        f"Measured {m['date']} at commit {m['commit']} on {m['cpu']} ({m['cores']} cores); "
        f"total wall time {r['wall_s'] / 60:.1f} min ({len(per_case)} cases, "
        f"{min(per_case, default=0):.0f}-{max(per_case, default=0):.0f} s each){' **quick mode**' if r['quick'] else ''}; "
        f"{r.get('jobs', 1)} case(s) at a time, each in its own process with {r.get('threads', '?')} torch / BLAS "
        f"thread(s); 1-minute load {m['load_start'][0]:.1f} at the start, "
        f"{m.get('load_end', m['load_start'])[0]:.1f} at the end (other work on the cores slows every figure of s).",
        f"`{r['command']}` (raw results: {_rel(r['out'])}).",
        f"Data: scikit-learn's digits{subset}, "
        f"{int(100 * TEST_FRACTION)}% clean test split, {N_GARBAGE} garbage images (text pages, photo crops) with "
        f"random labels in train, groups of {GROUP_SIZE} rows within a split. Case = rendering-noise kind-rate %.",
        "Renderings: " + "; ".join(f"`{k}` {v}" for k, v in RENDERINGS.items()) + ".",
        "Noise kinds: " + "; ".join(f"`{k}` {v}" for k, v in KINDS.items()) + ".",
        f"cleanloop: the real steps in-process (oof, flag, prune, train baseline / cleaned), model {cfg.get('model')}, "
        f"{cfg.get('epochs')} epochs, oof={cfg.get('oof')} with {cfg.get('n_folds')} folds, filter_by "
        f"{cfg.get('filter_by')}; overrides `{' '.join(r['cleanloop_overrides']) or '(none)'}`; flags = label issue "
        "or outlier (what prune drops). Peer: LogisticRegression on raw pixels, cross_val_predict over "
        "StratifiedGroupKFold (same folds count), cleanlab `find_label_issues` defaults, prune, refit.",
        f"Flags and top-100 (true issues among the 100 lowest label-quality rows; garbage counts as an issue) from "
        f"seed 0; BA = test balanced accuracy, mean over seeds {seeds}; gain = cleaned - baseline in points, mean "
        "and 95% t-interval over the per-seed paired differences (cleanloop: recipe.seed, one OOF; peer: fold "
        "shuffling, its baseline does not vary). Oracle BA = the same learner trained on the train rows less every "
        "truly bad one (the ceiling a perfect flagger would reach; cleanloop through `train role=cleaned "
        "cleaned_manifest=...`). s = seconds for that side of the case.",
        "",
        table(r),
        "",
        "Misses (cleanloop's flag F1 below the peer's, or on a 20% case a gain below both the peer's and +5 points):",
        "",
        *(miss or ["- none"]),
    ])


# ---------------------------------------------------------------------------------------------
# main


def setup_process(threads: int, verbose: bool) -> None:
    """Imports, thread counts and log levels, once per process (the main one or a pool worker)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built locally
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    import lightning  # noqa: F401  (it sets its loggers to INFO on import: quieten them after)
    import torch
    from threadpoolctl import threadpool_limits

    from cleanloop.config import register_resolvers
    from cleanloop.steps import flag, oof, prune, train  # noqa: F401

    torch.set_num_threads(threads)
    threadpool_limits(threads)  # the peer's BLAS (numpy / scipy) for the rest of the process
    if not verbose:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "cleanloop", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    register_resolvers()


def run_case(name: str, work: Path, *, n_rows: int | None, user: list[str], seeds: list[int]) -> dict:
    """One case end to end in its own folder (data, outputs, step cache, MLflow store): both sides."""
    case_dir = work / "data"
    t0 = time.perf_counter()
    info = build_case(parse_case(name), case_dir, n_rows=n_rows)
    t_build = time.perf_counter() - t0
    n_folds = int(compose_cfg(case_overrides(name, case_dir, work, user)).oof.n_folds)
    t0 = time.perf_counter()
    cl = run_cleanloop(name, case_dir, work, user=user, seeds=seeds)
    t_cl = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = run_peer(case_dir, n_folds=n_folds, seeds=seeds)
    t_peer = time.perf_counter() - t0
    secs = {"build": t_build, "cleanloop": t_cl, "peer": t_peer, "total": t_build + t_cl + t_peer}
    return {**info, "cleanloop": cl, "peer": peer, "seconds": secs}


def progress(i: int, n: int, c: dict, n_trainings: int) -> str:
    cl, peer, secs, cs = c["cleanloop"], c["peer"], c["seconds"], c["cleanloop"]["seconds"]
    return (f"[{i}/{n}] {c['case']}: {c['n_train']} train ({c['n_noisy']} noisy + {c['n_garbage']} garbage), "
            f"{c['n_test']} test | build {secs['build']:.1f}s, cleanloop {secs['cleanloop']:.0f}s (oof {cs['oof']:.0f}, "
            f"flag {cs['flag']:.1f}, prune {cs['prune']:.1f}, train {n_trainings}x {cs['train_each']:.1f}), "
            f"peer {secs['peer']:.1f}s, total {secs['total']:.0f}s | F1 cleanloop {cl['flags']['f1']:.3f} / peer "
            f"{peer['flags']['f1']:.3f}, gain {100 * cl['gain']['mean']:+.1f} / {100 * peer['gain']['mean']:+.1f} pts")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{len(QUICK_CASES)} cases, seeds 0,1, {QUICK_ROWS} digits, {' '.join(QUICK_OVERRIDES)}")
    p.add_argument("--cases", help="comma-separated RENDERING-KIND-RATE names, or default / quick / all "
                                   f"(default: {','.join(DEFAULT_CASES)})")
    p.add_argument("--cleanloop", default="", metavar="ARGS",
                   help="extra Hydra overrides for cleanloop's steps, e.g. \"model=tiny recipe.epochs=20\"")
    p.add_argument("--seeds", help="comma-separated train seeds (default 0,1,2; --quick 0,1)")
    p.add_argument("--n-rows", type=int, help=f"a stratified subset of the 1,797 digits (--quick: {QUICK_ROWS})")
    p.add_argument("--out", type=Path, help=f"JSON results (default {DEFAULT_OUT.relative_to(HERE.parent)}; "
                                            f"--quick: {QUICK_OUT.name})")
    p.add_argument("--work-dir", type=Path, help="keep cases, outputs and MLflow stores here (default: a temporary "
                                                 "folder, deleted)")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once, each in its own process (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads per job (default 1: on a shared 2-core machine two spinning OpenMP "
                        "threads made a training 4x slower, measured at load 5-9)")
    p.add_argument("--verbose", action="store_true", help="cleanloop's own INFO logs")
    p.add_argument("--from-json", type=Path, metavar="JSON", help="run nothing: print the B7 section of a results "
                                                                   "file (e.g. a candidate's) and return it")
    a = p.parse_args(argv)
    if a.from_json:
        results = json.loads(a.from_json.read_text())
        print(section(results))
        return results

    sys.path.insert(0, str(HERE))
    from run import machine  # noqa: E402  (bench/run.py)

    cases = expand_cases(a.cases or ("quick" if a.quick else "default"))
    seeds = [int(s) for s in (a.seeds or ("0,1" if a.quick else "0,1,2")).split(",")]
    n_rows = a.n_rows if a.n_rows is not None else (QUICK_ROWS if a.quick else None)
    user = (QUICK_OVERRIDES if a.quick else []) + shlex.split(a.cleanloop)
    out = a.out or (QUICK_OUT if a.quick else DEFAULT_OUT)
    jobs = max(1, min(a.jobs, len(cases)))
    m = machine()
    command = " ".join(["python bench/efficacy.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    print(f"B7 efficacy: {len(cases)} case(s), seeds {seeds}, {jobs} job(s) x {a.threads} thread(s), cleanloop "
          f"overrides {user or '(none)'}; commit {m['commit']}", flush=True)

    work = a.work_dir or Path(tempfile.mkdtemp(prefix="cleanloop-b7-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": m, "command": command, "quick": a.quick, "cases_requested": cases, "seeds": seeds,
               "n_rows": n_rows, "jobs": jobs, "threads": a.threads, "cleanloop_overrides": user, "out": str(out),
               "cases": []}
    done: dict[str, dict] = {}
    kw = {"n_rows": n_rows, "user": user, "seeds": seeds}
    t_all = time.perf_counter()
    try:
        if jobs == 1:
            setup_process(a.threads, a.verbose)
            for name in cases:
                done[name] = run_case(name, work / name, **kw)
                print(progress(len(done), len(cases), done[name], 2 * len(seeds)), flush=True)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=setup_process,
                                     initargs=(a.threads, a.verbose)) as pool:
                futures = {pool.submit(run_case, name, work / name, **kw): name for name in cases}
                for f in as_completed(futures):
                    done[futures[f]] = f.result()
                    print(progress(len(done), len(cases), done[futures[f]], 2 * len(seeds)), flush=True)
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["cases"] = [done[name] for name in cases]
    results["wall_s"] = time.perf_counter() - t_all
    m["load_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(section(results))
    print(f"\nwrote {out} ({results['wall_s'] / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    main()
