"""``cleanloop cycle``: audit -> oof -> flag -> prune -> train baseline and cleaned -> test flags -> review page -> compare.

One MLflow parent run with every step nested under it. Each step keeps its outputs in the step
cache (cleanloop.cache) under a key of its inputs and config, so a step whose outputs already
exist is skipped and says so. Ends with ``summary.json`` and a ten-second printed summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf, open_dict

from cleanloop import parallel
from cleanloop.config import file_hash
from cleanloop.io import write_json
from cleanloop.steps import audit, compare, flag, oof, prune, review, train
from cleanloop.steps.common import input_manifest_path, load_input, out_path
from cleanloop.tracking import (
    NOTE_TAG,
    artifact_url,
    compare_runs_url,
    parent_run_tags,
    run_url,
    runs_page_url,
    setup,
    ui_url,
)
from cleanloop.verdict import markdown

log = logging.getLogger(__name__)


def _with(cfg: DictConfig, **overrides: Any) -> DictConfig:
    new = cfg.copy()
    with open_dict(new):
        for dotted, value in overrides.items():
            OmegaConf.update(new, dotted, value, merge=False)
    return new


def _review(cfg: DictConfig) -> dict:
    page = review.run(cfg)
    return json.loads(Path(page).with_name("review_summary.json").read_text())


def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    exp_id = setup(cfg.tracking)
    manifest_path = input_manifest_path(cfg)  # builds the demo on first use
    m = load_input(cfg)
    timings: dict[str, float] = {}
    run_ids: dict[str, str] = {}
    results: dict[str, dict] = {}

    def step(name: str, fn: Callable[[], dict], seconds: float | None = None) -> dict:
        t0 = time.time()
        info = fn()
        timings[name] = round(time.time() - t0, 1) if seconds is None else seconds
        run_ids[name] = info.get("run_id", "")
        if info.get("reused"):
            log.info("cycle: %s skipped: outputs for the same inputs and config exist (key %s, run %s)",
                     name, info["key"], run_ids[name])
            mlflow.set_tag(f"cleanloop.reused.{name}", run_ids[name])
        results[name] = info
        return info

    tags = {"cleanloop.step": "cycle", "cleanloop.data": file_hash(m.source), **parent_run_tags()}
    with mlflow.start_run(run_name="cycle", tags=tags) as parent:
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        if cfg.audit.get("enabled", True):  # first: oof's folds keep copies together (audit.merge_groups)
            step("audit", lambda: audit.run(cfg))
        step("oof", lambda: oof.run(cfg))
        flag_info = step("flag", lambda: flag.run(cfg))
        prune_info = step("prune", lambda: prune.run(cfg))  # reads the flags and prune.decisions, not the page
        # compare.seeds pairs: seed s trains baseline and cleaned on the one cleaned manifest above;
        # the first pair publishes to train/<role>/, the others to train/<role>/seed-<s>/.
        seeds = [int(cfg.recipe.seed) + i for i in range(max(1, int(cfg.compare.get("seeds", 1))))]
        trainings = []
        suffixes = ["" if i == 0 else f"-seed{seed}" for i, seed in enumerate(seeds)]
        for i, (seed, suffix) in enumerate(zip(seeds, suffixes, strict=True)):
            for role in ("baseline", "cleaned"):
                rcfg = _with(cfg, role=role, **{"recipe.seed": seed, "cleaned_manifest": prune_info["path"]})
                publish = None if i == 0 else out_path(cfg, "train", role, f"seed-{seed}")
                trainings.append((f"train-{role}{suffix}",
                                  lambda rcfg=rcfg, publish=publish: train.run(rcfg, publish_to=publish)))
        # trainer.jobs > 1 (CPU): the trainings at once, in worker processes (cleanloop.parallel); each
        # writes its cache entry and run as it would here, and the steps below take its result
        n_jobs = parallel.jobs(cfg)
        ahead = parallel.run(trainings, n_jobs) if n_jobs > 1 and len(trainings) > 1 else {}
        for name, fn in trainings:
            if name in ahead:
                info, seconds = ahead[name]
                step(name, lambda info=info: info, seconds)
            else:
                step(name, fn)
        pairs = [(run_ids[f"train-baseline{s}"], run_ids[f"train-cleaned{s}"]) for s in suffixes]
        # the test rows, scored by the baselines just trained (their saved test probabilities, no inference)
        baselines = [Path(info["dir"]) / "test_predictions.parquet" for name, info in results.items()
                     if name.startswith("train-baseline")]
        test_info = step("flag-test", lambda: flag.run_test(cfg, predictions=baselines))
        # the page shows the flagged train rows and, in a tab of their own, the flagged test rows
        step("review", lambda: _review(_with(cfg, **{"review.test_issues": str(Path(test_info["dir"])
                                                                                / "test_label_issues.csv")})))
        cmp = step("compare", lambda: compare.run(_with(cfg, **{"compare.baseline": [a for a, _ in pairs],
                                                                  "compare.cleaned": [b for _, b in pairs]})))
        baseline = _mean_metrics([results[n] for n in results if n.startswith("train-baseline")])
        cleaned = _mean_metrics([results[n] for n in results if n.startswith("train-cleaned")])
        host = ui_url(cfg.tracking)
        recall = _with_test_counts(cmp["recall"], out_path(cfg, "train", "baseline", "metrics.json"))
        links = compare.compare_links(cfg, exp_id, cmp["run_id"], flag_info.get("run_id"))
        if "review page" not in links and results["review"].get("run_id"):
            links["review page"] = artifact_url(host, exp_id, results["review"]["run_id"], "review/index.html")
        flag_dir = out_path(cfg, "flag")
        summary = {
            "data": {"manifest": str(manifest_path), "n_train": int(len(m.train)), "classes": m.classes},
            **({"audit": {k: results["audit"][k] for k in ("n_pairs", "pairs_exact", "leaks/train_test",
                                                            "leaks/train_val", "conflicting_label_clusters")
                          if k in results["audit"]}} if "audit" in results else {}),
            "flag": {k: flag_info[k] for k in ("n_rows", "n_issues", "issue_rate", "n_outliers")}
            | ({"ground_truth": flag_info["ground_truth"]} if "ground_truth" in flag_info else {}),
            "test_flag": {k: test_info[k] for k in ("n_rows", "n_issues", "issue_rate", "n_outliers", "n_models")},
            "prune": {"n_train_before": prune_info["n_train"],
                      "n_train_after": prune_info["n_train"] - prune_info["n_pruned"],
                      "n_relabelled": prune_info["n_relabelled"]},
            "baseline": {k: baseline[k] for k in ("top1", "balanced_accuracy", "f1_macro")},
            "cleaned": {k: cleaned[k] for k in ("top1", "balanced_accuracy", "f1_macro")},
            "delta": {s: cmp[s] for s in ("top1", "balanced_accuracy", "f1_macro")},
            **({"corrected": cmp["corrected"]} if "corrected" in cmp else {}),
            "verdict": cmp["verdict"],
            "seeds": seeds, "n_test": cmp["n_test"], "confidence": cmp["confidence"],
            "recall": recall,
            "paths": {
                **({"duplicates": str(out_path(cfg, "audit", "duplicates.csv"))} if "audit" in results else {}),
                "oof_probs": str(out_path(cfg, "oof", "oof_probs.parquet")),
                "label_issues": str(flag_dir / "label_issues.csv"),
                "test_label_issues": str(flag_dir / "test_label_issues.csv"),
                "montage": str(flag_dir / "mislabel_candidates.png"),
                "review_page": str(out_path(cfg, "review", "index.html")),
                "cleaned_manifest": prune_info["path"], "pruned_rows": str(out_path(cfg, "prune", "pruned_rows.csv")),
                "recall_deltas": str(out_path(cfg, "compare", "recall_deltas.csv")),
                "chart": str(out_path(cfg, "compare", "recall_deltas.png")),
                "baseline_metrics": str(out_path(cfg, "train", "baseline", "metrics.json")),
                "cleaned_metrics": str(out_path(cfg, "train", "cleaned", "metrics.json")),
            },
            "mlflow": {
                "tracking_uri": mlflow.get_tracking_uri(), "experiment_id": exp_id, "cycle_run": parent.info.run_id,
                "runs": run_ids, "train_pairs": [list(p) for p in pairs], "runs_page": runs_page_url(host, exp_id),
                "compare_view": compare_runs_url(host, exp_id, [run_ids["train-baseline"], run_ids["train-cleaned"]]),
                "cycle_page": run_url(host, exp_id, parent.info.run_id), "links": links,
            },
            "reused": sorted(name for name, info in results.items() if info.get("reused")),
            "seconds": {**timings, "total": round(time.time() - t_start, 1)},
        }
        summary_path = out_path(cfg, "summary.json")
        write_json(summary_path, summary)
        mlflow.log_artifact(str(summary_path))
        mlflow.log_metrics(headline_metrics(summary, prune_info))
        note = markdown(summary["verdict"]["text"], recall, links=links, confidence=float(cmp["confidence"]))
        mlflow.set_tags({"cleanloop.verdict": summary["verdict"]["verdict"], NOTE_TAG: note})
        # the compare run gets the same description (its own lacks the cycle's test counts for old entries)
        if cmp.get("run_id"):
            try:
                mlflow.MlflowClient().set_tag(cmp["run_id"], NOTE_TAG, note)
            except mlflow.exceptions.MlflowException as e:
                log.warning("cycle: cannot describe compare run %s (%s)", cmp["run_id"], e.message.splitlines()[0])
    print(format_summary(summary), flush=True)
    return summary


def headline_metrics(summary: dict, prune_info: dict) -> dict[str, float]:
    """What the cycle run shows in the runs table: the answer (deltas with bounds) and the counts."""
    out = {}
    for stat in ("balanced_accuracy", "top1"):
        d = summary["delta"][stat]
        out |= {f"delta/{stat}": d["delta"], f"delta/{stat}/ci_low": d["ci_low"], f"delta/{stat}/ci_high": d["ci_high"]}
    out["flag/n_issues"] = summary["flag"]["n_issues"]
    out["prune/n_pruned"] = prune_info["n_pruned"]
    gt = summary["flag"].get("ground_truth")
    if gt:
        out |= {"flag/precision": gt["precision"], "flag/recall": gt["recall"]}
    return {k: float(v) for k, v in out.items() if v is not None}


def _with_test_counts(recall: list[dict], baseline_metrics: Path) -> list[dict]:
    """Each class's test rows (``n_test``): from the compare table, else the baseline's per-class support."""
    if all(r.get("n_test") is not None for r in recall):
        return recall
    try:
        per = json.loads(baseline_metrics.read_text())["per_class"]
    except (OSError, ValueError, KeyError):
        return recall
    return [r if r.get("n_test") is not None else {**r, "n_test": per.get(r["class"], {}).get("support")}
            for r in recall]


def _mean_metrics(runs: list[dict]) -> dict:
    """Headline test metrics averaged over a role's seeds."""
    return {k: sum(r[k] for r in runs) / len(runs) for k in ("top1", "balanced_accuracy", "f1_macro")}


def worst_regression(recall: list[dict]) -> str:
    """The class whose recall fell most, with its interval and test rows; or that none fell."""
    fell = [r for r in recall if r.get("delta") is not None and r["delta"] < 0]
    if not fell:
        return "worst regression: none (no class's recall fell)"
    r = min(fell, key=lambda r: (r["delta"], str(r["class"])))
    n = f", n={int(r['n_test'])} test rows" if r.get("n_test") is not None else ""
    sure = " (interval below 0)" if r.get("ci_high") is not None and r["ci_high"] < 0 else ""
    return (f"worst regression: {r['class']} recall {_pts(r['delta'])} pts "
            f"[{_pts(r['ci_low'])}, {_pts(r['ci_high'])}]{n}{sure}")


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def format_summary(s: dict) -> str:
    """The ten-second read: what was flagged, what moved, where to look."""
    f, d = s["flag"], s["delta"]
    lines = [f"cleanloop cycle: {s['data']['n_train']} train rows, {len(s['data']['classes'])} classes "
             f"({s['seconds']['total']:.0f}s)"]
    if "audit" in s:
        a = s["audit"]
        leaks = int(a.get("leaks/train_test", 0)) + int(a.get("leaks/train_val", 0))
        lines.append(f"  audit     {a.get('n_pairs', 0)} duplicate pairs ({int(a.get('pairs_exact', 0))} exact), "
                     f"{leaks} train<->test/val leaks, {int(a.get('conflicting_label_clusters', 0))} conflicting-label "
                     f"clusters -> {s['paths']['duplicates']}")
    flagged = f"  flagged   {f['n_issues']} label issues ({100 * f['issue_rate']:.1f}%) + {f['n_outliers']} outliers"
    if "ground_truth" in f:
        gt = f["ground_truth"]
        flagged += (f"; vs ground truth precision {gt['precision']:.2f}, recall {gt['recall']:.2f}, "
                    f"garbage found {gt['garbage_found']}/{gt['n_garbage']}")
    lines.append(flagged)
    lines.append(f"  pruned    {s['prune']['n_train_before'] - s['prune']['n_train_after']} train rows "
                 f"-> {s['paths']['cleaned_manifest']}")
    if "test_flag" in s:
        t = s["test_flag"]
        lines.append(f"  test      {t['n_issues']} test rows flagged ({100 * t['issue_rate']:.1f}%) "
                     f"-> {s['paths']['test_label_issues']}")
    lines.append(f"  verdict   {s['verdict']['text']}")
    for name, key in (("balanced accuracy", "balanced_accuracy"), ("top-1", "top1")):
        x = d[key]
        lines.append(f"  {name:<17} {x['value_a']:.3f} -> {x['value_b']:.3f}  ({_pts(x['delta'])} pts, "
                     f"95% CI {_pts(x['ci_low'])} .. {_pts(x['ci_high'])})")
    if "corrected" in s:  # the reviewer-corrected test split, beside the raw numbers above
        c = s["corrected"]
        x = c.get("balanced_accuracy")
        lines.append(f"  corrected test split ({c['n_relabelled']} relabelled, {c['n_removed']} removed): "
                     + (f"balanced accuracy {x['value_a']:.3f} -> {x['value_b']:.3f} ({_pts(x['delta'])} pts, "
                        f"95% CI {_pts(x['ci_low'])} .. {_pts(x['ci_high'])})" if x else "no test rows left"))
    moved = sorted((r for r in s["recall"] if r["delta"] is not None), key=lambda r: -abs(r["delta"]))[:3]
    lines.append("  recall moved most: " + "; ".join(
        f"{r['class']} {_pts(r['delta'])} [{_pts(r['ci_low'])}, {_pts(r['ci_high'])}]" for r in moved))
    lines.append("  " + worst_regression(s["recall"]))
    n_seeds = len(s.get("seeds") or [0])
    lines.append(f"  intervals {s.get('confidence', 0.95):.0%} paired bootstrap over {s['n_test']} test rows and "
                 f"{n_seeds} seed pair{'s' if n_seeds != 1 else ''} (recall: that class's test rows)")
    p, ml = s["paths"], s["mlflow"]
    links = ml.get("links", {})
    lines += [f"  montage   {p['montage']}", f"  review    {p['review_page']} (open in a browser; decisions -> "
              "`cleanloop prune prune.decisions=decisions.csv`"
              + (", the test tab's -> `compare.test_decisions=decisions.csv`" if "test_flag" in s else "") + ")",
              f"  chart     {p['chart']}",
              f"  MLflow    `make ui` (tracking.ui_url), then {ml['runs_page']}"]
    if ml.get("cycle_page"):
        lines.append(f"            this cycle: {ml['cycle_page']}")
    lines.append(f"            baseline vs cleaned side by side: {ml['compare_view']}")
    for label, url in links.items():
        lines.append(f"            {label}: {url}")
    return "\n".join(lines)
