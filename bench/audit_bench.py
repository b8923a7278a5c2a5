"""B8: the leakage audit: injected copies on the demo, and the embedding search at full scale.

Demo part: build the demo (scikit-learn's digits as 32-px PNGs, ``cleanloop.demo.build_demo``),
then inject copies of train images into test (cross-split leaks) and into train (some under
another label: conflicting-label copies), each an exact byte copy, resized, JPEG re-compressed or
lightly cropped, and flip a few test labels. ``cleanloop.audit.find_duplicates`` runs on the whole manifest at its defaults and its pairs
are scored against what was injected. A sweep of its two thresholds (perceptual-hash distance of a
candidate, pixel NCC of a confirmed pair) scores every setting from the same candidates.

Test-label part (not with --quick unless asked for with ``--part test-labels``): on the same
injected data, ``cleanloop train role=baseline`` for ``--test-seeds`` seeds, then ``cleanloop flag
flag.split=test`` (the test rows scored by those baselines), each through the CLI in a subprocess
at the project's defaults (model=cnn): how many of the flipped test labels are among the flagged
test rows (issue #15's bar: at least 80%), and how many other test rows are flagged.

Scale part: ``cleanloop.audit.embedding_near_pairs`` on N random D-dim embeddings with planted
near copies (cosine just above the threshold up to 0.999) and decoys just below it: wall and CPU
time, peak memory, recall of the planted pairs, decoys linked.

    python bench/audit_bench.py [--quick] [--part all|demo|test-labels|scale] [--n 121514] [--d 1152]
                                [--test-seeds 3] [--data DIR] [--out JSON]

The recorded run (bench/results/b8-audit.json and .log) was
``OPENBLAS_NUM_THREADS=1 nice -n 19 python bench/audit_bench.py`` on the project's 2-core machine
while other benchmarks ran: one BLAS thread was faster there than two, and kept the run to one core.

Prints the markdown section, then one JSON line; writes the JSON to ``--out`` (default
bench/results/b8-audit.json, or b8-audit-quick.json with --quick). ``--data DIR`` keeps the
injected dataset there (manifest.csv with relative paths, images/, ground_truth.csv updated for
the new rows, injected.csv: image_uuid, kind, source_uuid, transform, label, source_label).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
TRANSFORMS = ("exact", "resized", "jpeg", "cropped")
# Two distinct digits whose 8x8 ink arrays (0..16) are this close in L2 are a "natural" near
# duplicate of the original data, not a false pair. Only one pair of scikit-learn's 1,797 digits is
# (5.3: rows 1585 and 1648); the next closest is 7.5.
NATURAL_L2 = 6.0
SWEEP_DISTANCES = (4, 6, 8, 10, 12, 14)
SWEEP_NCC = (0.99, 0.993, 0.995, 0.996, 0.997, 0.998)


# ---------------------------------------------------------------------------------------------
# the injected dataset


def _transformed(src: Path, dst_stem: Path, transform: str, rng: np.random.Generator) -> tuple[Path, str]:
    """Write a copy of ``src`` next to ``dst_stem``; return its path and what was done."""
    if transform == "exact":
        dst = dst_stem.with_suffix(src.suffix)
        shutil.copyfile(src, dst)
        return dst, "byte copy"
    img = Image.open(src).convert("RGB")
    if transform == "resized":
        factor = float(rng.choice([rng.uniform(0.6, 0.9), rng.uniform(1.1, 1.5)]))
        size = (max(8, round(img.width * factor)), max(8, round(img.height * factor)))
        dst = dst_stem.with_suffix(".png")
        img.resize(size, Image.Resampling.BICUBIC).save(dst)
        return dst, f"resized {factor:.2f}x"
    if transform == "jpeg":
        quality = int(rng.integers(60, 86))
        dst = dst_stem.with_suffix(".jpg")
        img.save(dst, quality=quality)
        return dst, f"jpeg q{quality}"
    if transform == "cropped":
        left, top, right, bottom = rng.uniform(0.02, 0.05, 4)
        box = (round(img.width * left), round(img.height * top),
               img.width - round(img.width * right), img.height - round(img.height * bottom))
        dst = dst_stem.with_suffix(".png")
        img.crop(box).save(dst)
        return dst, "cropped " + " ".join(f"{s}{f:.1%}" for s, f in zip("ltrb", (left, top, right, bottom), strict=True))
    raise ValueError(transform)


def build(data: Path, *, seed: int = 0, quick: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the demo into ``data`` and inject copies and test-label errors.

    Returns the manifest (absolute paths) and the injected rows (image_uuid, kind, source_uuid,
    transform, label, source_label). Writes manifest.csv (relative paths, as the demo's),
    ground_truth.csv (the demo's, with the copies added and the flipped test rows marked noisy)
    and injected.csv into ``data``.
    """
    from cleanloop.demo import CLASS_NAMES, build_demo

    n_cross, n_train, n_errors = (8, 8, 6) if quick else (60, 40, 30)
    cross_relabel, train_relabel = (2, 3) if quick else (10, 15)
    build_demo(data, seed=seed)
    manifest = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(data / "ground_truth.csv", dtype={"image_uuid": str, "true_label": str},
                        keep_default_na=False)
    if quick:  # a few hundred rows: the same injections, a fraction of the candidate pairs
        keep = manifest.index[:300].union(manifest.index[manifest["image_uuid"].str.startswith("garbage")])
        manifest = manifest.loc[keep].reset_index(drop=True)
        truth = truth[truth["image_uuid"].isin(manifest["image_uuid"])].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    digit_train = manifest.index[(manifest["split"] == "train") & manifest["image_uuid"].str.startswith("digit")]
    sources = rng.choice(digit_train, n_cross + n_train, replace=False)
    true_label = dict(zip(truth["image_uuid"], truth["true_label"], strict=True))

    rows, injected = [], []
    for kind, picked, relabel, prefix in (("cross_split_copy", sources[:n_cross], cross_relabel, "copy"),
                                          ("train_copy", sources[n_cross:], train_relabel, "dup")):
        relabelled = set(rng.choice(len(picked), relabel, replace=False).tolist())
        for n, src in enumerate(picked):
            source = manifest.loc[src]
            transform = TRANSFORMS[n % len(TRANSFORMS)]
            uuid = f"{prefix}-{n:03d}"
            path, detail = _transformed(data / source["path"], data / "images" / uuid, transform, rng)
            label = source["label"]
            if n in relabelled:
                label = str(rng.choice([c for c in CLASS_NAMES if c != source["label"]]))
            # cross-split: a third under a group of its own (only the audit can see those);
            # within train: half
            own_group = n % 3 == 2 if kind == "cross_split_copy" else n % 2 == 1
            rows.append({"image_uuid": uuid, "path": f"images/{path.name}", "label": label,
                         "split": "test" if kind == "cross_split_copy" else "train",
                         "group": f"{prefix}-g{n:03d}" if own_group else source["group"]})
            injected.append({"image_uuid": uuid, "kind": kind, "source_uuid": source["image_uuid"],
                             "transform": detail, "label": label, "source_label": source["label"]})
            truth.loc[len(truth)] = {"image_uuid": uuid, "true_label": true_label[source["image_uuid"]],
                                     "is_noisy": label != true_label[source["image_uuid"]], "is_garbage": False}
    test_rows = manifest.index[manifest["split"] == "test"]
    for src in rng.choice(test_rows, n_errors, replace=False):
        old = manifest.loc[src, "label"]
        new = str(rng.choice([c for c in CLASS_NAMES if c != old]))
        manifest.loc[src, "label"] = new
        truth.loc[truth["image_uuid"] == manifest.loc[src, "image_uuid"], "is_noisy"] = True
        injected.append({"image_uuid": manifest.loc[src, "image_uuid"], "kind": "test_label_error",
                         "source_uuid": "", "transform": f"label {old} -> {new}", "label": new, "source_label": old})
    manifest = pd.concat([manifest, pd.DataFrame(rows)], ignore_index=True)
    injected = pd.DataFrame(injected)
    manifest.to_csv(data / "manifest.csv", index=False)
    truth.to_csv(data / "ground_truth.csv", index=False)
    injected.to_csv(data / "injected.csv", index=False)
    absolute = manifest.assign(path=[str(data / p) for p in manifest["path"]])
    return absolute, injected


# ---------------------------------------------------------------------------------------------
# scoring pairs against the injections


def _digit_of(manifest: pd.DataFrame, injected: pd.DataFrame) -> np.ndarray:
    """Index into scikit-learn's digits of each row's picture (a copy: its source's); -1 for garbage."""
    source = dict(zip(injected["image_uuid"], injected["source_uuid"], strict=True))
    out = []
    for uuid in manifest["image_uuid"]:
        original = source.get(uuid) or uuid
        out.append(int(original.split("-")[1]) if original.startswith("digit-") else -1)
    return np.array(out)


def verdicts(i: np.ndarray, j: np.ndarray, manifest: pd.DataFrame, injected: pd.DataFrame) -> np.ndarray:
    """``injected`` (both rows show the same original digit), ``natural`` (two distinct digits
    within NATURAL_L2) or ``false``, per pair of row indices."""
    from sklearn.datasets import load_digits

    digits = load_digits().data
    digit = _digit_of(manifest, injected)
    same = (digit[i] == digit[j]) & (digit[i] >= 0)
    near = np.zeros(len(i), bool)
    both = (digit[i] >= 0) & (digit[j] >= 0) & ~same
    near[both] = np.linalg.norm(digits[digit[i[both]]] - digits[digit[j[both]]], axis=1) <= NATURAL_L2
    return np.where(same, "injected", np.where(near, "natural", "false"))


def evaluate(i: np.ndarray, j: np.ndarray, manifest: pd.DataFrame, injected: pd.DataFrame) -> dict:
    """Score pairs (row indices of ``manifest``) against the injections."""
    from cleanloop import audit

    uuid = manifest["image_uuid"].to_numpy()
    split = manifest["split"].to_numpy()
    label = manifest["label"].to_numpy()
    verdict = verdicts(i, j, manifest, injected)
    found = {frozenset(p) for p in zip(uuid[i], uuid[j], strict=True)}

    def recall(kind: str, relabelled: bool | None = None) -> tuple[int, int]:
        rows = injected[injected["kind"] == kind]
        if relabelled is not None:
            rows = rows[(rows["label"] != rows["source_label"]) == relabelled]
        hits = sum(frozenset((c, s)) in found for c, s in zip(rows["image_uuid"], rows["source_uuid"], strict=True))
        return hits, len(rows)

    cross = ((split[i] == "train") & (split[j] == "test")) | ((split[i] == "test") & (split[j] == "train"))
    counts = {v: int((cross & (verdict == v)).sum()) for v in ("injected", "natural", "false")}
    n_cross = int(cross.sum())
    hits, total = recall("cross_split_copy")
    train_hits, train_total = recall("train_copy")
    conflict_hits, conflict_total = recall("train_copy", relabelled=True)
    relabelled_cross_hits, relabelled_cross_total = recall("cross_split_copy", relabelled=True)
    by_transform = {}
    for t in TRANSFORMS:
        rows = injected[injected["kind"].isin(["cross_split_copy", "train_copy"])
                        & injected["transform"].str.startswith({"exact": "byte", "jpeg": "jpeg"}.get(t, t))]
        by_transform[t] = [int(sum(frozenset((c, s)) in found for c, s in zip(rows["image_uuid"], rows["source_uuid"],
                                                                               strict=True))), len(rows)]
    # conflicting-label copies as the audit lists them (clusters of train rows with two labels)
    pairs = pd.DataFrame({"image_uuid_a": uuid[i], "image_uuid_b": uuid[j], "kind": "near"})
    listed = set(audit.conflicting_label_rows(pairs, manifest)["image_uuid"])
    conflicted = injected[(injected["kind"] == "train_copy") & (injected["label"] != injected["source_label"])]
    return {
        "pairs": len(i),
        "pairs_injected": int((verdict == "injected").sum()),
        "pairs_natural": int((verdict == "natural").sum()),
        "pairs_false": int((verdict == "false").sum()),
        "pairs_false_cross_label": int(((verdict == "false") & (label[i] != label[j])).sum()),
        "cross_split_found": n_cross,
        "cross_split_injected": counts["injected"],
        "cross_split_natural": counts["natural"],
        "cross_split_false": counts["false"],
        "cross_split_recall": hits / total if total else float("nan"),
        "cross_split_copies_found": [hits, total],
        # precision: natural look-alikes count as wrong (strict) or as right (they are duplicates)
        "cross_split_precision": counts["injected"] / n_cross if n_cross else 1.0,
        "cross_split_precision_with_natural": (counts["injected"] + counts["natural"]) / n_cross if n_cross else 1.0,
        "cross_split_relabelled_found": [relabelled_cross_hits, relabelled_cross_total],
        "train_recall": train_hits / train_total if train_total else float("nan"),
        "train_copies_found": [train_hits, train_total],
        "conflicting_label_copies_found": [conflict_hits, conflict_total],
        "conflicting_label_copies_listed": [int(sum(u in listed for u in conflicted["image_uuid"])), len(conflicted)],
        "found_by_transform": by_transform,
    }


def _indices(pairs: pd.DataFrame, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    index = pd.Index(manifest["image_uuid"])
    return index.get_indexer(pairs["image_uuid_a"]), index.get_indexer(pairs["image_uuid_b"])


def demo_part(data: Path, *, seed: int, quick: bool) -> dict:
    """Run find_duplicates on the injected demo at its defaults; sweep its thresholds."""
    from cleanloop import audit

    manifest, injected = build(data, seed=seed, quick=quick)
    wall, cpu = time.perf_counter(), time.process_time()
    pairs = audit.find_duplicates(manifest)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    default = evaluate(*_indices(pairs, manifest), manifest, injected)
    default.update(seconds=round(wall, 2), cpu_seconds=round(cpu, 2), rows=len(manifest),
                   exact_pairs=int((pairs["kind"] == "exact").sum()), near_pairs=int((pairs["kind"] == "near").sum()),
                   methods=pairs["method"].value_counts().to_dict())

    # The sweep: every candidate up to the widest distance, scored once.
    paths = manifest["path"].tolist()
    content = audit.content_hashes(paths)
    start = time.perf_counter()
    i, j, dist = audit.hash_near_pairs(audit.perceptual_hashes(paths), max_distance=max(SWEEP_DISTANCES))
    keep = content[i] != content[j]
    i, j, dist = i[keep], j[keep], dist[keep]
    needed, local = np.unique(np.r_[i, j], return_inverse=True)
    score = audit.pixel_similarity(audit.thumbnails([paths[r] for r in needed]), local[:len(i)], local[len(i):],
                                   paths=[paths[r] for r in needed])
    sweep_seconds = time.perf_counter() - start
    exact_i, exact_j = audit._exact_pairs(content)[["i", "j"]].to_numpy().T
    sweep = []
    settings = [(d, t) for d in SWEEP_DISTANCES for t in SWEEP_NCC] + [(d, None) for d in SWEEP_DISTANCES]
    for d, t in settings:
        take = (dist <= d) & ((score >= t) if t is not None else True)
        row = evaluate(np.r_[exact_i, i[take]], np.r_[exact_j, j[take]], manifest, injected)
        sweep.append({"phash_max_distance": d, "min_pixel_ncc": t, **row})
    # the margins behind the defaults: how the injected copies and the distinct pairs score
    verdict = verdicts(i, j, manifest, injected)
    copies = injected[injected["kind"] != "test_label_error"]
    index = pd.Index(manifest["image_uuid"])
    a, b = index.get_indexer(copies["image_uuid"]), index.get_indexer(copies["source_uuid"])
    hashes = audit.perceptual_hashes(paths)
    margins = {
        "copy_phash_distance_max": int(audit.popcount64(hashes[a] ^ hashes[b]).max()),
        "copy_score_min": float(score[verdict == "injected"].min()),
        "natural_scores": sorted(score[verdict == "natural"].round(4).tolist()),
        "false_scores_top5": sorted(score[verdict == "false"].round(4).tolist())[-5:],
    }
    check = next(r for r in sweep if r["phash_max_distance"] == audit.CANDIDATE_PHASH_MAX_DISTANCE
                 and r["min_pixel_ncc"] == audit.PIXEL_MIN_NCC)
    assert check["pairs"] == default["pairs"], "the sweep does not reproduce find_duplicates"
    return {
        "rows": len(manifest),
        "injected": injected["kind"].value_counts().to_dict(),
        "defaults": {"phash_max_distance": audit.CANDIDATE_PHASH_MAX_DISTANCE, "min_pixel_ncc": audit.PIXEL_MIN_NCC},
        "default": default,
        "sweep": sweep,
        "sweep_candidates": len(i),
        "sweep_seconds": round(sweep_seconds, 2),
        "margins": margins,
    }


# ---------------------------------------------------------------------------------------------
# test-label errors: the baseline's flags on the test rows


def _cli(args: list[str], cwd: Path) -> tuple[float, str]:
    """Run the `cleanloop` console script beside this interpreter; (seconds, stdout). A failure raises."""
    exe = Path(sys.executable).with_name("cleanloop")
    start = time.perf_counter()
    proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"cleanloop {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def label_error_part(data: Path, *, seed: int, quick: bool, n_seeds: int) -> dict:
    """Train the baseline(s) on the injected data and flag its test rows; score the flags against
    the flipped test labels of injected.csv (building the data first when ``data`` has none)."""
    if not (data / "injected.csv").is_file():
        build(data, seed=seed, quick=quick)
    injected = pd.read_csv(data / "injected.csv", dtype=str, keep_default_na=False)
    errors = set(injected.loc[injected["kind"] == "test_label_error", "image_uuid"])
    relabelled_copies = set(injected.loc[(injected["kind"] == "cross_split_copy")
                                         & (injected["label"] != injected["source_label"]), "image_uuid"])
    with tempfile.TemporaryDirectory(prefix="cleanloop-b8-test-labels-") as tmp:
        root = Path(tmp)
        common = ["data=manifest", f"data.manifest={data / 'manifest.csv'}", "data.name=b8",
                  f"paths.root_dir={root}", f"compare.seeds={n_seeds}"]
        train_seconds = [round(_cli(["train", "role=baseline", f"recipe.seed={seed + s}", *common], root)[0], 1)
                         for s in range(n_seeds)]
        flag_seconds, _ = _cli(["flag", "flag.split=test", f"recipe.seed={seed}", *common], root)
        table = pd.read_csv(root / "outputs" / "b8" / "flag" / "test_label_issues.csv", dtype={"image_uuid": str})
        summary = json.loads((root / "outputs" / "b8" / "flag" / "test_flag_summary.json").read_text())
    flagged = set(table.loc[table["is_label_issue"].astype(bool), "image_uuid"])
    found = len(errors & flagged)
    return {
        "test_rows": len(table), "seeds": n_seeds, "models_averaged": summary["n_models"],
        "injected_errors": len(errors), "errors_flagged": found,
        "errors_flagged_fraction": found / len(errors) if errors else 0.0,
        "meets_bar": bool(errors) and found / len(errors) >= 0.8,
        "flagged": len(flagged), "other_flagged": len(flagged - errors - relabelled_copies),
        "relabelled_copies_flagged": [len(relabelled_copies & flagged), len(relabelled_copies)],
        "precision": found / len(flagged) if flagged else 0.0,
        "train_seconds": train_seconds, "flag_seconds": round(flag_seconds, 1),
    }


# ---------------------------------------------------------------------------------------------
# the embedding search at scale


def planted_embeddings(n: int, d: int, *, n_planted: int, min_cosine: float, seed: int):
    """Unit random rows; ``n_planted`` pairs set to cosine in (min_cosine, 0.999], as many decoys just below."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = rng.choice(n, 4 * n_planted, replace=False)
    planted = rows[:2 * n_planted].reshape(2, -1)
    decoys = rows[2 * n_planted:].reshape(2, -1)
    for (a, b), low, high in ((planted, min_cosine + 0.002, 0.999), (decoys, min_cosine - 0.03, min_cosine - 0.002)):
        c = rng.uniform(low, high, len(a)).astype(np.float32)[:, None]
        # b := c a + sqrt(1 - c^2) z, z a unit vector orthogonal to a: cosine exactly c
        z = x[b] - np.sum(x[b] * x[a], axis=1, keepdims=True) * x[a]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        x[b] = c * x[a] + np.sqrt(1 - c**2) * z
    return x, planted, decoys


def scale_part(n: int, d: int, *, seed: int, n_planted: int, n_base: int) -> dict:
    """Time embedding_near_pairs on N x D planted embeddings; the full product on the first n_base rows."""
    from cleanloop import audit

    min_cosine, k = audit.EMBEDDING_MIN_COSINE, audit.EMBEDDING_K
    x, planted, decoys = planted_embeddings(n, d, n_planted=n_planted, min_cosine=min_cosine, seed=seed)
    basis = audit._projection(x, min_cosine, None)
    dims = d if basis is None else basis.shape[1]
    del basis
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    i, j, cos = audit.embedding_near_pairs(x, min_cosine=min_cosine, k=k)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    found = set(zip(i.tolist(), j.tolist(), strict=True))

    def hits(pairs):
        return sum((min(a, b), max(a, b)) in found for a, b in zip(*pairs.tolist(), strict=True))

    # the same search in full dimension (the block product), on the first n_base rows: its time
    # grows as N^2, so it is extrapolated to N
    sub = x[:n_base]
    base = time.perf_counter()
    full = audit.embedding_near_pairs(sub, min_cosine=min_cosine, k=k, dims=0)
    base = time.perf_counter() - base
    proj = time.perf_counter()
    projected = audit.embedding_near_pairs(sub, min_cosine=min_cosine, k=k, dims=dims if dims < d else 0)
    proj = time.perf_counter() - proj
    same = all(np.array_equal(a, b) for a, b in zip(full[:2], projected[:2], strict=True))
    return {
        "n": n, "d": d, "min_cosine": min_cosine, "k": k, "projected_dims": int(dims),
        "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "peak_traced_mib": round(peak / 2**20), "input_mib": round(x.nbytes / 2**20),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "pairs": len(i), "planted": n_planted, "planted_found": hits(planted), "recall": hits(planted) / n_planted,
        "decoys_found": hits(decoys), "min_cos_found": float(cos.min()) if len(cos) else None,
        "subset_rows": n_base, "subset_full_seconds": round(base, 2), "subset_projected_seconds": round(proj, 2),
        "subset_same_pairs": bool(same),
        "full_seconds_extrapolated": round(base * (n / n_base) ** 2, 0),
    }


# ---------------------------------------------------------------------------------------------
# report


def _fmt(p: float) -> str:
    return f"{p:.3f}"


def markdown(result: dict) -> str:
    lines = ["## B8: leakage audit (bench/audit_bench.py)", ""]
    lines.append(f"Measured {result['when']} at commit {result['commit']} on {result['machine']}"
                 + (" (--quick)" if result["quick"] else "") + ".")
    demo = result.get("demo")
    if demo:
        d = demo["default"]
        inj = demo["injected"]
        lines += [
            "",
            f"Demo digits ({demo['rows']} rows after injection) with {inj.get('cross_split_copy', 0)} train images "
            f"copied into test, {inj.get('train_copy', 0)} within train (exact, resized 0.6-1.5x, JPEG q60-85, "
            "cropped 2-5% a side, a quarter each; some under another group or label) and "
            f"{inj.get('test_label_error', 0)} test labels flipped (recorded, not scored here). "
            f"`find_duplicates` at its defaults (phash distance <= {demo['defaults']['phash_max_distance']}, "
            f"pixel NCC >= {demo['defaults']['min_pixel_ncc']}), no embeddings: "
            f"{d['seconds']} s wall ({d['cpu_seconds']} s CPU).",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| cross-split copies found (recall) | {d['cross_split_copies_found'][0]} / "
            f"{d['cross_split_copies_found'][1]} ({_fmt(d['cross_split_recall'])}) |",
            f"| cross-split pairs reported: injected / natural / false | {d['cross_split_injected']} / "
            f"{d['cross_split_natural']} / {d['cross_split_false']} |",
            f"| cross-split precision (natural counted wrong / right) | {_fmt(d['cross_split_precision'])} / "
            f"{_fmt(d['cross_split_precision_with_natural'])} |",
            f"| cross-split copies under another label found | {d['cross_split_relabelled_found'][0]} / "
            f"{d['cross_split_relabelled_found'][1]} |",
            f"| within-train copies found (recall) | {d['train_copies_found'][0]} / {d['train_copies_found'][1]} "
            f"({_fmt(d['train_recall'])}) |",
            f"| conflicting-label copies paired / listed by conflicting_label_rows | "
            f"{d['conflicting_label_copies_found'][0]} / {d['conflicting_label_copies_found'][1]}, "
            f"{d['conflicting_label_copies_listed'][0]} / {d['conflicting_label_copies_listed'][1]} |",
            f"| all pairs: exact / near; injected / natural / false (false across labels) | {d['exact_pairs']} / "
            f"{d['near_pairs']}; {d['pairs_injected']} / {d['pairs_natural']} / {d['pairs_false']} "
            f"({d['pairs_false_cross_label']}) |",
            "| copies found by transform | " + ", ".join(f"{t} {a}/{b}" for t, (a, b) in d["found_by_transform"].items())
            + " |",
            "",
            f"A pair is *injected* when both rows show the same original digit (a copy and its source), "
            f"*natural* when two distinct digits' 8x8 ink arrays are within L2 {NATURAL_L2} of each other "
            "(one pair of the 1,797 is), else *false*.",
            "",
            f"Margins: injected copies are within phash distance {demo['margins']['copy_phash_distance_max']} of their "
            f"source and score >= {demo['margins']['copy_score_min']:.4f} (pixel NCC); among the candidates, natural "
            f"pairs score {', '.join(f'{v:.4f}' for v in demo['margins']['natural_scores']) or '-'}, the five "
            f"best false ones {', '.join(f'{v:.4f}' for v in demo['margins']['false_scores_top5'][::-1])}.",
            "",
            f"Threshold sweep ({demo['sweep_candidates']} candidates up to distance {max(SWEEP_DISTANCES)}, pixel "
            f"scores in {demo['sweep_seconds']} s); \"-\" is the perceptual hash alone, unconfirmed:",
            "",
            "| phash distance | min pixel NCC | cross-split recall | cross-split precision | cross-split natural / false "
            "| train recall | conflicting copies | all false pairs (cross-label) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        default_d, default_t = demo["defaults"]["phash_max_distance"], demo["defaults"]["min_pixel_ncc"]
        for r in demo["sweep"]:
            d_, t_ = r["phash_max_distance"], r["min_pixel_ncc"]
            if not (d_ == default_d or t_ == default_t or t_ is None):
                continue
            mark = "**" if (d_, t_) == (default_d, default_t) else ""
            lines.append(
                f"| {mark}{d_}{mark} | {mark}{t_ if t_ is not None else '-'}{mark} | {_fmt(r['cross_split_recall'])} | "
                f"{_fmt(r['cross_split_precision'])} | {r['cross_split_natural']} / {r['cross_split_false']} | "
                f"{_fmt(r['train_recall'])} | {r['conflicting_label_copies_found'][0]} / "
                f"{r['conflicting_label_copies_found'][1]} | {r['pairs_false']} ({r['pairs_false_cross_label']}) |")
    t = result.get("test_labels")
    if t:
        lines += [
            "",
            f"Test-label errors: `cleanloop train role=baseline` on the injected data ({t['seeds']} seed(s), the "
            f"defaults: model=cnn; {', '.join(f'{x} s' for x in t['train_seconds'])}), then `cleanloop flag "
            f"flag.split=test` ({t['flag_seconds']} s, the {t['models_averaged']} baselines' test probabilities "
            f"averaged) on the {t['test_rows']} test rows:",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| flipped test labels among the flagged test rows (bar: >= 0.8) | {t['errors_flagged']} / "
            f"{t['injected_errors']} ({_fmt(t['errors_flagged_fraction'])}) |",
            f"| test rows flagged; of them flipped (precision) | {t['flagged']}; {_fmt(t['precision'])} |",
            f"| cross-split copies under another label flagged | {t['relabelled_copies_flagged'][0]} / "
            f"{t['relabelled_copies_flagged'][1]} |",
            f"| other test rows flagged | {t['other_flagged']} |",
        ]
    s = result.get("scale")
    if s:
        lines += [
            "",
            f"Embedding search (`embedding_near_pairs`, min_cosine {s['min_cosine']}, k {s['k']}) on {s['n']:,} random "
            f"unit {s['d']:,}-d float32 rows ({s['input_mib']} MiB) with {s['planted']:,} planted pairs at cosine "
            f"{s['min_cosine'] + 0.002:.3f}-0.999 and as many decoys at {s['min_cosine'] - 0.03:.2f}-"
            f"{s['min_cosine'] - 0.002:.3f}:",
            "",
            "| N | D | projected to | wall s | CPU s | peak traced MiB (input not counted) | max RSS MiB "
            "| planted found | decoys linked | full product, first rows: s (extrapolated to N) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {s['n']:,} | {s['d']:,} | {s['projected_dims']} | {s['seconds']} | {s['cpu_seconds']} | "
            f"{s['peak_traced_mib']} | {s['max_rss_mib']} | {s['planted_found']:,} / {s['planted']:,} | "
            f"{s['decoys_found']} | {s['subset_rows']:,} rows: {s['subset_full_seconds']} s, projected "
            f"{s['subset_projected_seconds']} s, same pairs: {s['subset_same_pairs']} "
            f"(~{s['full_seconds_extrapolated']:.0f} s at N) |",
        ]
    return "\n".join(lines) + "\n"


def _blas_threads() -> str:
    from threadpoolctl import threadpool_info

    return ",".join(str(p["num_threads"]) for p in threadpool_info() if p.get("user_api") == "blas") or "?"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test: a few hundred rows, a small embedding set")
    p.add_argument("--part", choices=("all", "demo", "test-labels", "scale"), default="all")
    p.add_argument("--n", type=int, default=None, help="embedding rows (default 121,514; 12,000 with --quick)")
    p.add_argument("--d", type=int, default=None, help="embedding dimensions (default 1,152; 256 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-seeds", type=int, default=3, help="baseline seeds the test-label part trains (cycle's "
                   "default for model=cnn)")
    p.add_argument("--data", type=Path, default=None, help="keep the injected dataset in this folder")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    n = a.n or (12_000 if a.quick else 121_514)
    d = a.d or (256 if a.quick else 1_152)
    out = a.out or HERE / "results" / ("b8-audit-quick.json" if a.quick else "b8-audit.json")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    result = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit, "quick": a.quick,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, BLAS threads {_blas_threads()}, "
                   f"load average {os.getloadavg()[0]:.1f} at the start",
        "argv": sys.argv[1:] if argv is None else argv,
    }
    test_labels = a.part == "test-labels" or (a.part == "all" and not a.quick)  # trains models: minutes
    with tempfile.TemporaryDirectory(prefix="cleanloop-b8-audit-") as tmp:
        data = a.data if a.data is not None else Path(tmp) / "data"
        if a.part in ("all", "demo"):
            result["demo"] = demo_part(data, seed=a.seed, quick=a.quick)
        if test_labels:
            result["test_labels"] = label_error_part(data, seed=a.seed, quick=a.quick, n_seeds=a.test_seeds)
    if a.part in ("all", "scale"):
        result["scale"] = scale_part(n, d, seed=a.seed, n_planted=200 if a.quick else 3_000,
                                     n_base=min(n, 4_000 if a.quick else 16_384))
    print(markdown(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
