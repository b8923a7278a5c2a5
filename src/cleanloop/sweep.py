"""Hydra multirun support: one MLflow parent run per sweep and ``sweep_summary.csv`` at the end.

``SweepCallback`` is registered in conf/config.yaml (``hydra.callbacks``). At the start of a
multirun it creates the sweep's parent run (jobs nest under it through an environment variable,
which joblib and submitit workers inherit); at the end it groups the jobs by their overrides
less ``recipe.seed``, compares each group's baseline and cleaned runs across all its seeds
(paired bootstrap over seeds and test rows), and writes one table, best option first.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from cleanloop.config import register_resolvers
from cleanloop.errors import CleanloopError
from cleanloop.io import write_csv

log = logging.getLogger(__name__)

# mlflow and cleanloop.tracking are imported where used: Hydra builds this callback for every
# command, and a bad manifest should fail in about a second, not after the tracking stack loads.

SEED_KEY = "recipe.seed"

# Hydra turns an exception in a callback into a warning and still exits 0; the hooks record theirs
# here and ``cleanloop.cli`` exits 1 with one line when the multirun returns (:func:`pop_errors`).
_ERRORS: list[str] = []


def _record(hook: str, e: BaseException) -> None:
    first = (str(e).strip().splitlines() or [""])[0]
    _ERRORS.append(f"{hook} failed ({type(e).__name__}: {first})" if first else f"{hook} failed ({type(e).__name__})")


def pop_errors() -> list[str]:
    """The sweep callback's failures since the last call (cleared)."""
    errors = list(_ERRORS)
    _ERRORS.clear()
    return errors


def job_config(cfg: DictConfig) -> DictConfig:
    """A copy of the multirun config shaped like a job's: without the ``hydra`` node.

    At the end of a multirun that node still holds per-job fields that no job filled in
    (``hydra.job.num``, ``hydra.runtime.*``, with ``hydra.sweep.subdir: ${hydra.job.num}``), so
    resolving the whole config (the run's logged params and config.yaml) would fail on them.
    """
    job_cfg = cfg.copy()
    with open_dict(job_cfg):
        job_cfg.pop("hydra", None)
    return job_cfg


def _option(overrides: list[str], common: set[str]) -> str:
    """The sweep point: the overrides that vary between jobs, less the seed (jobs differing only in
    seed are one option, compared across their seeds)."""
    keep = [o for o in overrides if o not in common and not o.lstrip("+~").startswith((f"{SEED_KEY}=", "step="))]
    return " ".join(keep) or "(defaults)"


def collect_jobs(sweep_dir: Path) -> pd.DataFrame:
    """One row per finished job folder: its number, overrides, option and summary (cycle or flag)."""
    rows, all_overrides = [], []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        summary, kind = None, None
        for name, k in (("summary.json", "cycle"), ("flag/flag_summary.json", "flag")):
            if (job / name).is_file():
                summary, kind = json.loads((job / name).read_text()), k
                break
        all_overrides.append(overrides)
        rows.append({"job": int(job.name), "overrides": " ".join(overrides), "kind": kind, "summary": summary})
    common = set.intersection(*(set(o) for o in all_overrides)) if all_overrides else set()
    for row, overrides in zip(rows, all_overrides, strict=True):
        row["option"] = _option(overrides, common)
    return pd.DataFrame(rows)


def job_pairs(summaries: list[dict]) -> list[tuple[str, str]]:
    """Every (baseline, cleaned) train run pair of an option's cycle jobs, each pair once.

    A job with ``compare.seeds`` > 1 trained several pairs (``mlflow.train_pairs``); jobs that
    share a seed reuse one cached baseline run, so a pair can appear twice across jobs.
    """
    pairs: list[tuple[str, str]] = []
    for s in summaries:
        runs = s["mlflow"]
        for pair in runs.get("train_pairs") or [(runs["runs"]["train-baseline"], runs["runs"]["train-cleaned"])]:
            if tuple(pair) not in pairs:
                pairs.append(tuple(pair))
    return pairs


def summary_rows(cfg: DictConfig, jobs: pd.DataFrame, sweep_dir: Path) -> pd.DataFrame:
    """sweep_summary.csv: per option, delta balanced accuracy (all seeds pooled) and per-class recall deltas."""
    from cleanloop.steps import compare

    out = []
    for option, group in jobs.groupby("option", sort=False):
        done = [s for s in group["summary"] if s]
        row: dict = {"option": option, "jobs": " ".join(str(j) for j in group["job"]), "n_seeds": len(done)}
        if done and "delta" in done[0]:
            pairs = job_pairs(done)
            job_cfg = job_config(cfg)
            with open_dict(job_cfg):
                job_cfg.compare.baseline = [a for a, _ in pairs]
                job_cfg.compare.cleaned = [b for _, b in pairs]
                job_cfg.compare.issues = str(Path(done[0]["paths"]["label_issues"]).with_name("issues_per_class.csv"))
                job_cfg.paths.out_dir = str(sweep_dir / "compare" / f"option-{len(out)}")
            try:
                pooled = compare.run(job_cfg)
            except CleanloopError as e:
                log.warning("sweep: could not compare option %s: %s", option, e)
                continue
            ba = pooled["balanced_accuracy"]
            row["n_seeds"] = pooled["n_seeds"]
            row.update({"verdict": pooled["verdict"]["verdict"], "delta_balanced_accuracy": ba["delta"],
                        "ci_low": ba["ci_low"], "ci_high": ba["ci_high"],
                        "delta_top1": pooled["top1"]["delta"],
                        "n_issues": sum(s["flag"]["n_issues"] for s in done) / len(done)})
            if "ground_truth" in done[0]["flag"]:
                row["flag_precision"] = done[0]["flag"]["ground_truth"]["precision"]
                row["flag_recall"] = done[0]["flag"]["ground_truth"]["recall"]
            row.update({f"delta_recall/{r['class']}": r["delta"] for r in pooled["recall"]})
        elif done:  # a flag-only sweep
            s = done[0]
            row.update({"n_issues": s["n_issues"], "issue_rate": s["issue_rate"], "n_outliers": s["n_outliers"]})
            if "ground_truth" in s:
                row.update({"flag_precision": s["ground_truth"]["precision"], "flag_recall": s["ground_truth"]["recall"]})
        out.append(row)
    table = pd.DataFrame(out)
    sort = "delta_balanced_accuracy" if "delta_balanced_accuracy" in table else "flag_precision"
    if sort in table:
        table = table.sort_values(sort, ascending=False, kind="mergesort")
    return table.reset_index(drop=True)


_NOTE_COLUMNS = {  # sweep_summary.csv column -> the description table's header, in this order
    "option": "option", "verdict": "verdict", "delta_balanced_accuracy": "Δ balanced acc.", "ci_low": "CI low",
    "ci_high": "CI high", "delta_top1": "Δ top-1", "n_seeds": "seeds", "n_issues": "flagged",
    "issue_rate": "issue rate", "n_outliers": "outliers", "flag_precision": "flag precision",
    "flag_recall": "flag recall", "jobs": "jobs",
}


def sweep_markdown(table: pd.DataFrame) -> str:
    """The sweep parent run's description (``mlflow.note.content``): one row per point, best first."""
    cols = [c for c in _NOTE_COLUMNS if c in table.columns]
    signed = {"delta_balanced_accuracy", "ci_low", "ci_high", "delta_top1"}

    def cell(col: str, v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        if isinstance(v, float | np.floating):
            return f"{v:+.4f}" if col in signed else f"{v:.3f}" if abs(v) < 1 else f"{v:g}"
        return str(v).replace("|", "\\|")

    lines = [f"**Sweep: {len(table)} point(s), best first** (full table with per-class recall deltas: "
             "`sweep_summary.csv`)", "",
             "| " + " | ".join(_NOTE_COLUMNS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in cols) + " |" for _, row in table.iterrows()]
    return "\n".join(lines)


class SweepCallback(Callback):
    """Hydra callback: parent MLflow run per multirun, sweep_summary.csv when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import mlflow

        from cleanloop.tracking import SWEEP_PARENT_ENV, setup

        register_resolvers()
        try:
            exp_id = setup(config.tracking)  # also creates the store once, before parallel jobs race to
            step = config.get("step") or "sweep"
            run = mlflow.MlflowClient().create_run(exp_id, run_name=f"sweep-{step}",
                                                   tags={"cleanloop.step": "sweep", "cleanloop.sweep_step": step})
        except Exception as e:
            _record("sweep start", e)
            raise
        os.environ[SWEEP_PARENT_ENV] = run.info.run_id
        log.info("sweep: MLflow parent run %s", run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from cleanloop.tracking import SWEEP_PARENT_ENV

        run_id = os.environ.pop(SWEEP_PARENT_ENV, None)
        if run_id is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            self._summarise(config, run_id, sweep_dir)
        except Exception as e:
            _record(f"sweep summary for {sweep_dir}", e)
            log.debug("sweep: on_multirun_end failed", exc_info=True)
            raise

    @staticmethod
    def _summarise(config: DictConfig, run_id: str, sweep_dir: Path) -> None:
        """sweep_summary.csv and the parent run's metrics; the parent run ends FINISHED or FAILED."""
        import mlflow

        from cleanloop.tracking import SWEEP_PARENT_ENV, metric_key

        client = mlflow.MlflowClient()
        status = "FINISHED"
        try:
            jobs = collect_jobs(sweep_dir)
            os.environ[SWEEP_PARENT_ENV] = run_id  # the pooled compare runs nest under the sweep too
            try:
                table = summary_rows(config, jobs, sweep_dir)
            finally:
                os.environ.pop(SWEEP_PARENT_ENV, None)
            path = write_csv(sweep_dir / "sweep_summary.csv", table)
            client.log_artifact(run_id, str(path))
            best = table.iloc[0] if len(table) else None
            if best is not None:
                for col in ("delta_balanced_accuracy", "flag_precision"):
                    if col in table and pd.notna(best.get(col)):
                        client.log_metric(run_id, f"best/{col}", float(best[col]))
                client.set_tag(run_id, "cleanloop.best_option", str(best["option"]))
            for i, r in table.iterrows():
                if "delta_balanced_accuracy" in table and pd.notna(r.get("delta_balanced_accuracy")):
                    client.log_metric(run_id, f"option/{metric_key(r['option'])}/delta_balanced_accuracy",
                                      float(r["delta_balanced_accuracy"]), step=i)
            from cleanloop.tracking import NOTE_TAG

            client.set_tag(run_id, NOTE_TAG, sweep_markdown(table))
            print(f"sweep summary ({len(table)} options, best first): {path}")
            with pd.option_context("display.width", 160, "display.max_columns", 8):
                print(table.drop(columns=[c for c in table.columns if c.startswith("delta_recall/")]).to_string(index=False))
        except Exception:
            status = "FAILED"
            raise
        finally:
            client.set_terminated(run_id, status)
