"""``cleanloop compare``: did cleaning help, class by class, beyond noise?

Pairs the latest cleaned training run(s) with baseline run(s) of the same recipe, test split
and input (one pair per ``recipe.seed``), or the run ids in ``compare.baseline`` /
``compare.cleaned``; runs a paired bootstrap over the test rows (and seed pairs); writes
``compare/recall_deltas.csv`` and ``.png`` and logs ``delta/*`` to a compare run.
With ``compare.flag_runs=[A,B]`` it also sets two flag sets side by side. With
``audit.test_leaks=exclude`` and ``compare.test_decisions=PATH`` it also reports every delta on
the test split without leaked rows (``deleaked``) and on the reviewer-corrected test split
(``corrected``), beside the raw numbers, which never change.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from cleanloop.bootstrap import STATISTICS, paired_bootstrap, recall_deltas_chart
from cleanloop.config import file_hash, short_hash
from cleanloop.errors import CleanloopError
from cleanloop.io import write_csv, write_json
from cleanloop.pruning import read_decisions
from cleanloop.steps.common import cached, load_input, out_path, read_csv_strings
from cleanloop.steps.locate import audit_output, cleaned_output
from cleanloop.tracking import (
    NOTE_TAG,
    log_artifact_files,
    metric_key,
    picture_links,
    setup,
    step_run,
    ui_url,
)
from cleanloop.verdict import decide, describe, markdown

log = logging.getLogger(__name__)

PAIR_TAGS = ("cleanloop.recipe", "cleanloop.test", "cleanloop.source_data")


def _train_runs(exp_id: str) -> pd.DataFrame:
    runs = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string="tags.`cleanloop.step` = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    for tag in (*PAIR_TAGS, "cleanloop.role", "cleanloop.seed", "cleanloop.data"):
        col = f"tags.{tag}"
        if col not in runs.columns:
            runs[col] = None
    return runs


def _run_tags(run_id: str) -> dict:
    try:
        return mlflow.get_run(run_id).data.tags
    except mlflow.exceptions.MlflowException as e:
        raise CleanloopError(f"run {run_id}: not found in {mlflow.get_tracking_uri()} ({e.message.splitlines()[0]})") from e


def find_pairs(cfg: DictConfig, exp_id: str) -> list[tuple[str, str]]:
    """[(baseline run id, cleaned run id)], one per seed; refuse pairs of different recipes."""
    cc = cfg.compare
    if cc.get("baseline") or cc.get("cleaned"):
        if not (cc.get("baseline") and cc.get("cleaned")):
            raise CleanloopError("compare: give both compare.baseline=RUN_ID and compare.cleaned=RUN_ID, or neither")
        as_list = lambda v: [str(x) for x in v] if OmegaConf.is_list(v) or isinstance(v, list) else [str(v)]  # noqa: E731
        baselines, cleaneds = as_list(cc.baseline), as_list(cc.cleaned)
        if len(baselines) != len(cleaneds):
            raise CleanloopError(f"compare: {len(baselines)} baseline run(s) but {len(cleaneds)} cleaned run(s); "
                                 "give one baseline per cleaned run (one pair per seed)")
        recipes = set()
        for base_id, clean_id in zip(baselines, cleaneds, strict=True):
            a, b = _run_tags(base_id), _run_tags(clean_id)
            for tag in PAIR_TAGS:
                if a.get(tag) != b.get(tag):
                    what = {"cleanloop.recipe": "recipes", "cleanloop.test": "test splits",
                            "cleanloop.source_data": "input manifests"}[tag]
                    raise CleanloopError(
                        f"compare: the {what} differ (baseline run {base_id}: {tag}={a.get(tag)}, cleaned run "
                        f"{clean_id}: {tag}={b.get(tag)}); retrain both roles with the same recipe and data"
                    )
            recipes.add(a.get("cleanloop.recipe"))
        if len(recipes) > 1:
            raise CleanloopError(f"compare: the run pairs use different recipes {sorted(recipes)}; compare one recipe")
        return list(zip(baselines, cleaneds, strict=True))
    runs = _train_runs(exp_id)
    cleaned = runs[runs["tags.cleanloop.role"] == "cleaned"]
    if cleaned.empty:
        raise CleanloopError("compare: no finished cleaned training run in this experiment; "
                             "run `cleanloop train role=cleaned` (or `make train-cleaned`) first")
    latest = cleaned.iloc[0]
    same = np.ones(len(runs), dtype=bool)
    for tag in PAIR_TAGS:
        same &= (runs[f"tags.{tag}"] == latest[f"tags.{tag}"]).to_numpy()
    group = _one_cleaned_manifest(cfg, runs[same])
    base_all = runs[runs["tags.cleanloop.role"] == "baseline"]
    if base_all.empty:
        raise CleanloopError("compare: no finished baseline training run in this experiment; "
                             "run `cleanloop train role=baseline` (or `make train-baseline`) first")
    pairs = []
    for seed, c_rows in group[group["tags.cleanloop.role"] == "cleaned"].groupby("tags.cleanloop.seed", sort=True):
        b_rows = group[(group["tags.cleanloop.role"] == "baseline") & (group["tags.cleanloop.seed"] == seed)]
        if not b_rows.empty:
            pairs.append((b_rows.iloc[0]["run_id"], c_rows.iloc[0]["run_id"]))
    if not pairs:
        b = base_all.iloc[0]
        diff = [t for t in PAIR_TAGS if b[f"tags.{t}"] != latest[f"tags.{t}"]]
        raise CleanloopError(
            f"compare: the latest cleaned run {latest['run_id']} has no baseline of the same recipe, test split and "
            f"seed (latest baseline {b['run_id']} differs in {', '.join(diff) or 'cleanloop.seed'}); retrain the "
            "baseline with the same recipe: `cleanloop train role=baseline` with the cleaned run's overrides"
        )
    return pairs


def _this_cleaned_manifest(cfg: DictConfig) -> Path | None:
    """The cleaned manifest this config's lineage leads to (``cleaned_manifest=``, else its prune output);
    None when there is none to read (the input manifest is not there either: nothing is built for it)."""
    if cfg.get("cleaned_manifest"):
        path = Path(str(cfg.cleaned_manifest))
        return path if path.is_file() else None
    if not Path(str(cfg.data.manifest)).is_file():
        return None
    try:
        return cleaned_output(cfg, load_input(cfg))
    except CleanloopError:
        return None


def _one_cleaned_manifest(cfg: DictConfig, group: pd.DataFrame) -> pd.DataFrame:
    """``group`` (train runs of one recipe, test split and input) kept to the cleaned runs of one cleaned
    manifest (``cleanloop.data``) and every baseline: this config's cleaned manifest; when this config has
    none, the only one there is. Refuse, listing the candidates, when this config's has no cleaned run or
    when it has none and there are several."""
    is_cleaned = group["tags.cleanloop.role"] == "cleaned"
    hashes = group.loc[is_cleaned, "tags.cleanloop.data"]
    mine = _this_cleaned_manifest(cfg)
    want = file_hash(mine) if mine is not None else None
    if want is not None and (hashes == want).any():
        return group[~is_cleaned | (group["tags.cleanloop.data"] == want)]
    if want is None and hashes.nunique() <= 1:
        return group
    listed = []
    for data, rows in group[is_cleaned].groupby("tags.cleanloop.data", sort=False):
        seeds = ",".join(sorted(set(rows["tags.cleanloop.seed"].astype(str))))
        listed.append(f"cleaned manifest {data}: run(s) {', '.join(rows['run_id'])} (seeds {seeds})")
    where = f" (this config's, {mine}, has no cleaned run)" if mine is not None else ""
    raise CleanloopError(
        f"compare: {hashes.nunique()} cleaned manifest(s) have cleaned runs of this recipe, test split and "
        f"input{where}: {'; '.join(listed)}; train role=cleaned on this config's, or choose with "
        "cleaned_manifest=PATH or compare.baseline=... compare.cleaned=..."
    )


def _test_predictions(run_id: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.parquet",
                                                       dst_path=tmp)
        except Exception as e:
            raise CleanloopError(f"run {run_id}: no test_predictions.parquet artifact; is it a cleanloop train run?") from e
        return pd.read_parquet(path)


def _leaked_test_rows(cfg: DictConfig) -> set[str] | None:
    """``audit.test_leaks=exclude``: the test rows with a copy in train (the audit's duplicates.csv), else None."""
    if cfg.get("audit") is None or cfg.audit.get("test_leaks", "report") == "report":
        return None
    if cfg.audit.test_leaks != "exclude":
        raise CleanloopError(f"audit.test_leaks={cfg.audit.test_leaks!r}: choose report or exclude")
    path = audit_output(cfg, load_input(cfg), "duplicates.csv")
    if not path.is_file():
        raise CleanloopError(f"{path}: no audit of this manifest yet; run `cleanloop audit` first (cycle does), "
                             "or set audit.test_leaks=report")
    pairs = pd.read_csv(path, dtype=str, keep_default_na=False)
    leaked = set()
    for a, b in (("a", "b"), ("b", "a")):
        hit = (pairs[f"split_{a}"] == "test") & (pairs[f"split_{b}"] == "train")
        leaked.update(pairs.loc[hit, f"image_uuid_{a}"])
    return leaked


def _manifest_train_uuids(cfg: DictConfig) -> set[str]:
    """The input manifest's train rows (decisions on them are prune's, not compare's); empty when it is
    not there to read (compare given run ids only)."""
    if not Path(str(cfg.data.manifest)).is_file():  # never build the demo here
        return set()
    try:
        return set(load_input(cfg).train["image_uuid"])
    except CleanloopError:
        return set()


def read_test_decisions(path: Path, *, test_uuids, classes: list[str], train_uuids=frozenset()) -> pd.DataFrame:
    """``compare.test_decisions``: the reviewer's decisions on test rows (the review page's export).

    Decisions on train rows of the manifest (``train_uuids``) are left out: one exported file
    feeds both ``prune.decisions`` and this. Any other row that is not a test row, or a relabel to
    an unknown class, is refused in one line.

    Returns
    -------
    pd.DataFrame
        :func:`cleanloop.pruning.read_decisions` rows of the test rows only (``image_uuid, action,
        new_label``), with ``attrs["n_train_rows"]``: the decisions left out.
    """
    raw = read_csv_strings(path, "test decisions file",
                           "export it from the review page's test tab (Export decisions.csv), or write "
                           "image_uuid,decision")
    test, train = {str(u) for u in test_uuids}, {str(u) for u in train_uuids}
    if "image_uuid" in raw.columns:
        uuids = raw["image_uuid"].astype(str).str.strip()
        other = ~uuids.isin(test | train) & (uuids != "")
        if other.any():
            first = list(dict.fromkeys(uuids[other]))[:3]
            raise CleanloopError(
                f"{path}: {int(other.sum())} decision(s) name rows that are not test rows of the compared runs "
                f"(first: {first} at line {int(other.to_numpy().argmax()) + 2}); compare.test_decisions corrects "
                "the test split only: fix the ids or delete those rows")
    decisions = read_decisions(raw, classes=classes, known_uuids=test | train, source=str(path))
    on_test = decisions["image_uuid"].isin(test)
    out = decisions[on_test].reset_index(drop=True)
    out.attrs["n_train_rows"] = int((~on_test).sum())
    return out


def correct_test_split(uuids, labels: np.ndarray, decisions: pd.DataFrame,
                       classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The corrected test split: (labels, kept rows), only the reviewed rows changed.

    Parameters
    ----------
    uuids : sequence of str, shape (N,)
        The test rows, in the order of ``labels``.
    labels : np.ndarray of int, shape (N,)
        Their given class indices.
    decisions : pd.DataFrame
        :func:`read_test_decisions` (``image_uuid, action, new_label``): ``drop`` removes the row,
        ``relabel`` gives it ``new_label``, ``keep`` leaves it as it is.
    classes : list of str, shape (K,)

    Returns
    -------
    (np.ndarray of int, shape (N,), np.ndarray of bool, shape (N,))
        The corrected labels (a removed row keeps its old one) and which rows stay.
    """
    index = {c: i for i, c in enumerate(classes)}
    row = {str(u): i for i, u in enumerate(uuids)}
    corrected, keep = np.array(labels, copy=True), np.ones(len(labels), dtype=bool)
    for u, action, new in decisions[["image_uuid", "action", "new_label"]].itertuples(index=False):
        i = row[str(u)]
        if action == "drop":
            keep[i] = False
        elif action == "relabel":
            corrected[i] = index[str(new)]
    return corrected, keep


def _aligned(pairs: list[tuple[str, str]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """classes, labels (N,), baseline preds (S, N), cleaned preds (S, N), test uuids (N,) on the same test rows."""
    ref = None
    preds_a, preds_b = [], []
    for a_id, b_id in pairs:
        for run_id, out in ((a_id, preds_a), (b_id, preds_b)):
            df = _test_predictions(run_id).sort_values("image_uuid").reset_index(drop=True)
            classes = [c for c in df.columns if c not in ("image_uuid", "label", "predicted_label")]
            if ref is None:
                ref = (df["image_uuid"].tolist(), df["label"].tolist(), classes)
            elif (df["image_uuid"].tolist(), df["label"].tolist(), classes) != ref:
                raise CleanloopError(f"run {run_id}: its test rows or classes differ from run {pairs[0][0]}'s; "
                                     "compare needs both models scored on the same test split")
            index = {c: i for i, c in enumerate(classes)}
            out.append(df["predicted_label"].map(index).to_numpy())
    uuids, labels, classes = ref
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.array([index[c] for c in labels]), np.stack(preds_a), np.stack(preds_b), uuids


def _issue_rates(cfg: DictConfig, classes: list[str]) -> pd.Series:
    path = _issues_path(cfg)
    if not path.is_file():
        log.warning("compare: %s not found; issue_rate left empty", path)
        return pd.Series(np.nan, index=classes)
    per = pd.read_csv(path, dtype={"class": str}, keep_default_na=False)
    return per.set_index("class")["issue_rate"].astype(float).reindex(classes)


def _flag_set(ref: str) -> pd.DataFrame:
    """A flag run's label_issues.csv, from a run id or a path."""
    path = Path(ref)
    if not path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = Path(mlflow.artifacts.download_artifacts(run_id=ref, artifact_path="label_issues.csv",
                                                                dst_path=tmp))
                return pd.read_csv(path, dtype={"image_uuid": str, "given_label": str}, keep_default_na=False)
            except Exception as e:
                raise CleanloopError(f"compare.flag_runs: {ref!r} is neither a label_issues.csv nor a flag run id") from e
    return pd.read_csv(path, dtype={"image_uuid": str, "given_label": str}, keep_default_na=False)


def flag_overlap(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per class: rows flagged by A, by B, by both, by one only; and the rows only one flagged."""
    flags = lambda df: df["is_label_issue"].astype(str).str.lower().isin(["true", "1"])  # noqa: E731
    fa = a.loc[flags(a), ["image_uuid", "given_label"]]
    fb = b.loc[flags(b), ["image_uuid", "given_label"]]
    merged = fa.merge(fb, on=["image_uuid", "given_label"], how="outer", indicator=True)
    merged["flagged_by"] = merged["_merge"].map({"left_only": "a_only", "right_only": "b_only", "both": "both"})
    per = merged.pivot_table(index="given_label", columns="flagged_by", values="image_uuid", aggfunc="count",
                             fill_value=0).reindex(columns=["both", "a_only", "b_only"], fill_value=0)
    per = per.reset_index().rename(columns={"given_label": "class"})
    per["n_a"], per["n_b"] = per["both"] + per["a_only"], per["both"] + per["b_only"]
    only = merged[merged["flagged_by"] != "both"][["image_uuid", "given_label", "flagged_by"]]
    return per[["class", "n_a", "n_b", "both", "a_only", "b_only"]], only.sort_values(["flagged_by", "given_label",
                                                                                        "image_uuid"])


COMPARE_FILES = ["recall_deltas.csv", "recall_deltas.png", "compare_summary.json", "flag_overlap.csv",
                 "flag_only_rows.csv", "recall_deltas_deleaked.csv", "recall_deltas_corrected.csv"]


def _flag_run_of(cfg: DictConfig) -> str | None:
    """The flag run whose issue rates this compare read (from ``flag_summary.json`` beside them), if any."""
    import json

    summary = _issues_path(cfg).with_name("flag_summary.json")
    try:
        return json.loads(summary.read_text()).get("run_id") if summary.is_file() else None
    except (OSError, ValueError):
        return None


def compare_links(cfg: DictConfig, exp_id: str, compare_run: str, flag_run: str | None) -> dict[str, str]:
    """Artifact deep links for the compare run's description: its chart, the montage, the review page."""
    review_run = None
    if flag_run:
        try:
            tags = mlflow.MlflowClient().get_run(flag_run).data.tags
            review_run = flag_run if tags.get("cleanloop.review_run") else None
        except mlflow.exceptions.MlflowException:
            flag_run = None  # flagged in another store: no link
    return picture_links(ui_url(cfg.tracking), exp_id, compare_run=compare_run, flag_run=flag_run,
                         review_run=review_run)


def _issues_path(cfg: DictConfig) -> Path:
    return Path(cfg.compare.issues) if cfg.compare.get("issues") else out_path(cfg, "flag", "issues_per_class.csv")


def run(cfg: DictConfig) -> dict:
    """Compare paired runs (cached by the run ids, options and issue rates); returns the compare summary."""
    exp_id = setup(cfg.tracking)
    pairs = find_pairs(cfg, exp_id)
    issues = _issues_path(cfg)
    options = {k: v for k, v in OmegaConf.to_container(cfg.compare, resolve=True).items()
               if k not in ("baseline", "cleaned", "issues", "test_decisions")}
    leaked = _leaked_test_rows(cfg)
    parts = {"pairs": pairs, "compare": options, "issues": file_hash(issues) if issues.is_file() else None}
    if leaked is not None:  # only then: keys of plain compares stay as they were
        parts["leaked_test_rows"] = short_hash(sorted(leaked))
    decisions = Path(str(cfg.compare.test_decisions)) if cfg.compare.get("test_decisions") else None
    if decisions is not None:  # likewise; its content, not its name
        if not decisions.is_file():
            raise CleanloopError(f"compare.test_decisions={decisions}: not found; export decisions.csv from the "
                                 "review page's test tab, or leave it unset")
        parts["test_decisions"] = file_hash(decisions)
    return cached(cfg, "compare", short_hash(parts), lambda d: _compare(cfg, pairs, d, leaked, decisions),
                  publish_to=out_path(cfg, "compare"), names=COMPARE_FILES)


def _recall_table(cfg: DictConfig, classes: list[str], labels: np.ndarray, boot: dict) -> pd.DataFrame:
    rec = boot["recall"]
    return pd.DataFrame({
        "class": classes, "recall_baseline": rec["value_a"].to_numpy(), "recall_cleaned": rec["value_b"].to_numpy(),
        "delta": rec["delta"].to_numpy(), "ci_low": rec["ci_low"].to_numpy(), "ci_high": rec["ci_high"].to_numpy(),
        "issue_rate": _issue_rates(cfg, classes).to_numpy(),
        "n_test": np.bincount(labels, minlength=len(classes)),  # the test rows behind each recall
    }).sort_values(["issue_rate", "class"], ascending=[False, True], kind="mergesort").reset_index(drop=True)


def _variant_split(cfg: DictConfig, name: str, classes: list[str], labels: np.ndarray, preds_a: np.ndarray,
         preds_b: np.ndarray, out_dir: Path) -> dict:
    """The comparison on a variant of the test split (``deleaked``, ``corrected``), beside the raw one:
    ``recall_deltas_<name>.csv``, ``<name>/delta/<stat>`` metrics with bounds; returns {stat: figures}."""
    cc = cfg.compare
    boot = paired_bootstrap(labels, preds_a, preds_b, num_classes=len(classes), n_bootstrap=cc.n_bootstrap,
                            confidence=cc.confidence, seed=cc.seed)
    write_csv(out_dir / f"recall_deltas_{name}.csv", _recall_table(cfg, classes, labels, boot))
    out = {}
    for stat in STATISTICS:
        s = boot[stat]
        out[stat] = {k: float(v) for k, v in s.items()}
        mlflow.log_metrics({f"{name}/delta/{stat}": float(s["delta"]), f"{name}/delta/{stat}/ci_low": float(s["ci_low"]),
                            f"{name}/delta/{stat}/ci_high": float(s["ci_high"])})
    return out


def _compare(cfg: DictConfig, pairs: list[tuple[str, str]], out_dir: Path, leaked: set[str] | None = None,
             test_decisions: Path | None = None) -> dict:
    classes, labels, preds_a, preds_b, uuids = _aligned(pairs)
    cc = cfg.compare
    decisions = None
    if test_decisions is not None:  # refused before the run opens
        decisions = read_test_decisions(test_decisions, test_uuids=uuids, classes=classes,
                                        train_uuids=_manifest_train_uuids(cfg))
    boot = paired_bootstrap(labels, preds_a, preds_b, num_classes=len(classes), n_bootstrap=cc.n_bootstrap,
                            confidence=cc.confidence, seed=cc.seed)
    table = _recall_table(cfg, classes, labels, boot)
    baseline_ids, cleaned_ids = [a for a, _ in pairs], [b for _, b in pairs]
    tags = {"cleanloop.baseline_runs": ",".join(baseline_ids), "cleanloop.cleaned_runs": ",".join(cleaned_ids),
            "cleanloop.recipe": _run_tags(cleaned_ids[0]).get("cleanloop.recipe", "")}
    with step_run(cfg, "compare", tags=tags) as run:
        write_csv(out_dir / "recall_deltas.csv", table)
        n_seeds = len(pairs)
        recall_deltas_chart(table, out_dir / "recall_deltas.png",
                            title=f"Recall change after cleaning, {cc.confidence:.0%} CI "
                                  f"(paired bootstrap over {len(labels)} test rows, {n_seeds} seed pair"
                                  f"{'s' if n_seeds > 1 else ''})")
        metrics = {}
        for _, r in table.iterrows():
            key = f"delta/recall/{metric_key(r['class'])}"
            metrics.update({key: r["delta"], f"{key}/ci_low": r["ci_low"], f"{key}/ci_high": r["ci_high"]})
        for stat in STATISTICS:
            s = boot[stat]
            metrics.update({f"delta/{stat}": s["delta"], f"delta/{stat}/ci_low": s["ci_low"],
                            f"delta/{stat}/ci_high": s["ci_high"], f"baseline/{stat}": s["value_a"],
                            f"cleaned/{stat}": s["value_b"]})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if pd.notna(v)})
        decision = decide(boot["balanced_accuracy"], table, n_classes=int(cc.get("verdict_classes", 3)))
        decision["text"] = describe(decision, confidence=float(cc.confidence), n_seeds=n_seeds, n_test=int(len(labels)))
        mlflow.set_tags({"cleanloop.verdict": decision["verdict"], **{
            f"cleanloop.verdict.{metric_key(c['class'])}": c["verdict"] for c in decision["top_issue_classes"]}})
        summary = {"run_id": run.info.run_id, "baseline_runs": baseline_ids, "cleaned_runs": cleaned_ids,
                   "n_seeds": n_seeds, "n_test": int(len(labels)), "confidence": float(cc.confidence),
                   "verdict": decision,
                   **{stat: {k: float(v) for k, v in boot[stat].items()} for stat in STATISTICS},
                   "recall": table.replace({np.nan: None}).to_dict(orient="records")}
        artifacts = [out_dir / "recall_deltas.csv", out_dir / "recall_deltas.png"]
        if leaked is not None:  # beside the raw test split, never instead of it
            keep = ~np.isin(np.asarray(uuids, dtype=object), list(leaked))
            summary["deleaked"] = {"n_test": int(keep.sum()), "n_excluded": int((~keep).sum())}
            if keep.any():
                summary["deleaked"].update(_variant_split(cfg, "deleaked", classes, labels[keep], preds_a[:, keep],
                                                preds_b[:, keep], out_dir))
                artifacts.append(out_dir / "recall_deltas_deleaked.csv")
            mlflow.log_metric("deleaked/n_excluded", summary["deleaked"]["n_excluded"])
            log.info("compare: audit.test_leaks=exclude: %d of %d test rows have a copy in train; without them "
                     "balanced accuracy delta %s (compare/recall_deltas_deleaked.csv)", int((~keep).sum()),
                     len(keep), f"{summary['deleaked']['balanced_accuracy']['delta']:+.4f}" if keep.any() else "n/a")
        if decisions is not None:  # beside the raw test split, never instead of it
            fixed, keep = correct_test_split(uuids, labels, decisions, classes)
            relabelled = int((keep & (fixed != labels)).sum())
            summary["corrected"] = {"decisions": str(test_decisions), "n_test": int(keep.sum()),
                                    "n_removed": int((~keep).sum()), "n_relabelled": relabelled,
                                    "n_decisions": len(decisions),
                                    "n_train_decisions_ignored": int(decisions.attrs.get("n_train_rows", 0))}
            if keep.any():
                summary["corrected"].update(_variant_split(cfg, "corrected", classes, fixed[keep], preds_a[:, keep],
                                                 preds_b[:, keep], out_dir))
                artifacts.append(out_dir / "recall_deltas_corrected.csv")
            mlflow.log_metrics({"corrected/n_removed": summary["corrected"]["n_removed"],
                                "corrected/n_relabelled": relabelled})
            ba_c = summary["corrected"].get("balanced_accuracy")
            log.info("compare: compare.test_decisions: %d test row(s) relabelled, %d removed (%s); on the corrected "
                     "split balanced accuracy delta %s (compare/recall_deltas_corrected.csv)", relabelled,
                     int((~keep).sum()), test_decisions, f"{ba_c['delta']:+.4f}" if ba_c else "n/a")
        if cc.get("flag_runs"):
            refs = list(cc.flag_runs)
            if len(refs) != 2:
                raise CleanloopError("compare.flag_runs: give exactly two flag runs, e.g. compare.flag_runs=[ID_A,ID_B]")
            per, only = flag_overlap(_flag_set(str(refs[0])), _flag_set(str(refs[1])))
            write_csv(out_dir / "flag_overlap.csv", per)
            write_csv(out_dir / "flag_only_rows.csv", only)
            n_both, n_a, n_b = int(per["both"].sum()), int(per["n_a"].sum()), int(per["n_b"].sum())
            union = n_a + n_b - n_both
            flags = {"flags/n_a": n_a, "flags/n_b": n_b, "flags/n_both": n_both,
                     "flags/jaccard": n_both / union if union else 1.0}
            mlflow.log_metrics(flags)
            mlflow.set_tags({"cleanloop.flag_run_a": str(refs[0]), "cleanloop.flag_run_b": str(refs[1])})
            summary["flags"] = {**flags, "a": str(refs[0]), "b": str(refs[1])}
            artifacts += [out_dir / "flag_overlap.csv", out_dir / "flag_only_rows.csv"]
        flag_run = _flag_run_of(cfg)
        summary["links"] = compare_links(cfg, run.info.experiment_id, run.info.run_id, flag_run)
        mlflow.set_tag(NOTE_TAG, markdown(decision["text"], summary["recall"], links=summary["links"],
                                          confidence=float(cc.confidence)))
        write_json(out_dir / "compare_summary.json", summary)
        log_artifact_files([*artifacts, out_dir / "compare_summary.json"])
    ba = boot["balanced_accuracy"]
    log.info("compare: %s", decision["text"])
    log.info("compare: balanced accuracy %.4f -> %.4f (delta %+.4f, %.0f%% CI %+.4f..%+.4f) over %d seed pair(s) "
             "-> %s", ba["value_a"], ba["value_b"], ba["delta"], 100 * cc.confidence, ba["ci_low"], ba["ci_high"],
             n_seeds, out_path(cfg, "compare"))
    return summary
