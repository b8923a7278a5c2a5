"""``cleanloop cycle``: demo-data -> oof -> flag -> prune -> train baseline -> train cleaned -> compare.

One MLflow parent run with every step nested under it. A step whose outputs already exist for
the same inputs and config is skipped (its stamp in ``<out_dir>/.stamps/`` records the key
and the run that made them). Ends with ``summary.json`` and a ten-second printed summary.
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

from cleanloop.config import file_hash, short_hash
from cleanloop.io import write_json
from cleanloop.steps import compare, flag, oof, prune, train
from cleanloop.steps.common import input_manifest_path, load_input, out_path
from cleanloop.tracking import compare_runs_url, runs_page_url, setup

log = logging.getLogger(__name__)


def _hash_or_none(path: Path) -> str | None:
    return file_hash(path) if path.is_file() else None


class Stamps:
    """Per-step record of the key (inputs + config) that produced the step's current outputs."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / ".stamps"

    def get(self, step: str, key: str, outputs: list[Path]) -> dict | None:
        path = self.dir / f"{step}.json"
        if not path.is_file() or not all(p.exists() for p in outputs):
            return None
        stamp = json.loads(path.read_text())
        return stamp if stamp.get("key") == key else None

    def put(self, step: str, key: str, **info: Any) -> None:
        write_json(self.dir / f"{step}.json", {"key": key, **info})


def _with(cfg: DictConfig, **overrides: Any) -> DictConfig:
    new = cfg.copy()
    with open_dict(new):
        for dotted, value in overrides.items():
            OmegaConf.update(new, dotted, value, merge=False)
    return new


def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    exp_id = setup(cfg.tracking)
    manifest_path = input_manifest_path(cfg)  # builds the demo on first use
    m = load_input(cfg)
    out_dir = out_path(cfg, "")
    stamps = Stamps(out_dir)
    data_hash = file_hash(m.source)
    timings: dict[str, float] = {}
    run_ids: dict[str, str] = {}

    def step(name: str, key_parts: dict, outputs: list[Path], fn: Callable[[], Any], run_id: Callable[[Any], str]):
        key = short_hash(key_parts)
        stamp = stamps.get(name, key, outputs)
        if stamp is not None:
            log.info("cycle: %s skipped: outputs for the same inputs and config exist (key %s, run %s)",
                     name, key, stamp.get("run_id"))
            mlflow.set_tag(f"cleanloop.reused.{name}", stamp.get("run_id", ""))
            run_ids[name] = stamp.get("run_id", "")
            timings[name] = 0.0
            return stamp
        t0 = time.time()
        result = fn()
        timings[name] = round(time.time() - t0, 1)
        run_ids[name] = run_id(result)
        stamps.put(name, key, run_id=run_ids[name], seconds=timings[name])
        return result

    def latest_child(step_tag: str) -> str:
        runs = mlflow.search_runs(experiment_ids=[exp_id], max_results=1, order_by=["attributes.start_time DESC"],
                                  filter_string=f"tags.`cleanloop.step` = '{step_tag}'")
        return runs.iloc[0]["run_id"] if not runs.empty else ""

    with mlflow.start_run(run_name="cycle", tags={"cleanloop.step": "cycle", "cleanloop.data": data_hash}) as parent:
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        oof_path = out_path(cfg, "oof", "oof_probs.parquet")
        step("oof", {"oof": oof.oof_key(cfg, data_hash, m.classes)}, [oof_path],
             lambda: oof.run(cfg), lambda _: latest_child("oof"))
        flag_dir = out_path(cfg, "flag")
        step("flag", {"oof": _hash_or_none(oof_path), "data": data_hash, "flag": cfg.flag,
                      "oof_file": cfg.flag.get("oof")},
             [flag_dir / "label_issues.csv", flag_dir / "flag_summary.json"],
             lambda: flag.run(cfg), lambda _: json.loads((flag_dir / "flag_summary.json").read_text())["run_id"])
        issues_path = flag_dir / "label_issues.csv"
        decisions = Path(cfg.prune.decisions) if cfg.prune.get("decisions") else None
        step("prune", {"issues": _hash_or_none(issues_path), "data": data_hash, "prune": cfg.prune,
                       "decisions": _hash_or_none(decisions) if decisions else None},
             [out_path(cfg, "prune", "pruned_rows.csv")], lambda: prune.run(cfg), lambda _: latest_child("prune"))
        cleaned_path = train.cleaned_manifest_path(cfg)
        recipe = train.recipe_hash(cfg, with_seed=True)
        trainer_key = OmegaConf.to_container(cfg.trainer, resolve=True)
        metrics = {}
        for role, data in (("baseline", data_hash), ("cleaned", file_hash(cleaned_path))):
            metrics_path = out_path(cfg, "train", role, "metrics.json")
            result = step(f"train-{role}", {"recipe": recipe, "data": data, "source": data_hash, "trainer": trainer_key},
                          [metrics_path], lambda role=role: train.run(_with(cfg, role=role)), lambda r: r["run_id"])
            metrics[role] = json.loads(metrics_path.read_text()) if "top1" not in result else result
        cmp_cfg = _with(cfg, **{"compare.baseline": run_ids["train-baseline"],
                                "compare.cleaned": run_ids["train-cleaned"]})
        summary_cmp = compare.run(cmp_cfg)
        run_ids["compare"] = summary_cmp["run_id"]
        flag_summary = json.loads((flag_dir / "flag_summary.json").read_text())

        host = "http://127.0.0.1:5000"
        summary = {
            "data": {"manifest": str(manifest_path), "n_train": int(len(m.train)), "classes": m.classes},
            "flag": {k: flag_summary[k] for k in ("n_rows", "n_issues", "issue_rate", "n_outliers")}
            | ({"ground_truth": flag_summary["ground_truth"]} if "ground_truth" in flag_summary else {}),
            "prune": {"n_train_before": int(len(m.train)),
                      "n_train_after": int(len(load_input(cfg, cleaned_path).train))},
            "baseline": {k: metrics["baseline"][k] for k in ("top1", "balanced_accuracy", "f1_macro")},
            "cleaned": {k: metrics["cleaned"][k] for k in ("top1", "balanced_accuracy", "f1_macro")},
            "delta": {s: summary_cmp[s] for s in ("top1", "balanced_accuracy", "f1_macro")},
            "recall": summary_cmp["recall"],
            "paths": {
                "oof_probs": str(oof_path), "label_issues": str(issues_path),
                "montage": str(flag_dir / "mislabel_candidates.png"),
                "cleaned_manifest": str(cleaned_path), "pruned_rows": str(out_path(cfg, "prune", "pruned_rows.csv")),
                "recall_deltas": str(out_path(cfg, "compare", "recall_deltas.csv")),
                "chart": str(out_path(cfg, "compare", "recall_deltas.png")),
                "baseline_metrics": str(out_path(cfg, "train", "baseline", "metrics.json")),
                "cleaned_metrics": str(out_path(cfg, "train", "cleaned", "metrics.json")),
            },
            "mlflow": {
                "tracking_uri": mlflow.get_tracking_uri(), "experiment_id": exp_id, "cycle_run": parent.info.run_id,
                "runs": run_ids, "runs_page": runs_page_url(host, exp_id),
                "compare_view": compare_runs_url(host, exp_id, [run_ids["train-baseline"], run_ids["train-cleaned"]]),
            },
            "seconds": {**timings, "total": round(time.time() - t_start, 1)},
        }
        summary_path = out_dir / "summary.json"
        write_json(summary_path, summary)
        mlflow.log_artifact(str(summary_path))
        d = summary["delta"]
        mlflow.log_metrics({"delta/top1": d["top1"]["delta"], "delta/balanced_accuracy": d["balanced_accuracy"]["delta"],
                            "flag/n_issues": summary["flag"]["n_issues"]})
    print(format_summary(summary), flush=True)
    return summary


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def format_summary(s: dict) -> str:
    """The ten-second read: what was flagged, what moved, where to look."""
    f, d = s["flag"], s["delta"]
    lines = [f"cleanloop cycle: {s['data']['n_train']} train rows, {len(s['data']['classes'])} classes "
             f"({s['seconds']['total']:.0f}s)"]
    flagged = f"  flagged   {f['n_issues']} label issues ({100 * f['issue_rate']:.1f}%) + {f['n_outliers']} outliers"
    if "ground_truth" in f:
        gt = f["ground_truth"]
        flagged += (f"; vs ground truth precision {gt['precision']:.2f}, recall {gt['recall']:.2f}, "
                    f"garbage found {gt['garbage_found']}/{gt['n_garbage']}")
    lines.append(flagged)
    lines.append(f"  pruned    {s['prune']['n_train_before'] - s['prune']['n_train_after']} train rows "
                 f"-> {s['paths']['cleaned_manifest']}")
    for name, key in (("balanced accuracy", "balanced_accuracy"), ("top-1", "top1")):
        x = d[key]
        lines.append(f"  {name:<17} {x['value_a']:.3f} -> {x['value_b']:.3f}  ({_pts(x['delta'])} pts, "
                     f"95% CI {_pts(x['ci_low'])} .. {_pts(x['ci_high'])})")
    moved = sorted((r for r in s["recall"] if r["delta"] is not None), key=lambda r: -abs(r["delta"]))[:3]
    lines.append("  recall moved most: " + "; ".join(
        f"{r['class']} {_pts(r['delta'])} [{_pts(r['ci_low'])}, {_pts(r['ci_high'])}]" for r in moved))
    p = s["paths"]
    lines += [f"  montage   {p['montage']}", f"  chart     {p['chart']}",
              f"  MLflow    `make ui`, then {s['mlflow']['runs_page']}",
              f"            baseline vs cleaned side by side: {s['mlflow']['compare_view']}"]
    return "\n".join(lines)
