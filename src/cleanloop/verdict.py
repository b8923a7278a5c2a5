"""Did cleaning help? The verdict from the paired-bootstrap intervals, as the team's rule states it.

The rule: *if balanced accuracy and the recalls of the classes with the most flags rise,
cleaning helped; if not, the flags were mostly hard-but-correct examples.* "Rise" means the
interval of the cleaned - baseline delta lies above zero; an interval that straddles zero is
``inconclusive``, never read as a gain or a loss. Pure functions, no I/O.
"""

from __future__ import annotations

import math

import pandas as pd

VERDICTS = ("helped", "hurt", "inconclusive")


def verdict(ci_low: float | None, ci_high: float | None) -> str:
    """``helped`` when the interval lies above zero, ``hurt`` when below, ``inconclusive`` otherwise.

    An interval touching zero, or a missing bound (a class with no test rows), is inconclusive.
    """
    if ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
        return "inconclusive"
    if ci_low > 0:
        return "helped"
    if ci_high < 0:
        return "hurt"
    return "inconclusive"


def top_issue_classes(table: pd.DataFrame, *, n: int) -> pd.DataFrame:
    """The ``n`` classes with the highest issue rates (ties by name), from a recall-deltas table.

    ``table`` has columns ``class, issue_rate, delta, ci_low, ci_high`` (and may have more);
    classes without an issue rate (no flag file) are never chosen.
    """
    rated = table[table["issue_rate"].notna()]
    return rated.sort_values(["issue_rate", "class"], ascending=[False, True], kind="mergesort").head(max(0, n))


def decide(balanced_accuracy: dict, recall_table: pd.DataFrame, *, n_classes: int = 3) -> dict:
    """The verdict on balanced accuracy and on the recalls of the ``n_classes`` most-flagged classes.

    Parameters
    ----------
    balanced_accuracy : dict with ``delta, ci_low, ci_high`` (fractions, cleaned - baseline).
    recall_table : one row per class with ``class, issue_rate, recall_baseline, recall_cleaned,
        delta, ci_low, ci_high``.
    n_classes : how many of the highest-issue-rate classes to judge.

    Returns
    -------
    dict with ``verdict`` (the balanced-accuracy verdict, the headline), ``balanced_accuracy``
    (its delta, bounds and verdict) and ``top_issue_classes`` (one dict per judged class, highest
    issue rate first, each with its own verdict).
    """
    ba = {k: float(balanced_accuracy[k]) for k in ("delta", "ci_low", "ci_high")}
    ba["verdict"] = verdict(ba["ci_low"], ba["ci_high"])
    classes = []
    for _, r in top_issue_classes(recall_table, n=n_classes).iterrows():
        row = {"class": str(r["class"]), "issue_rate": float(r["issue_rate"])}
        for k in ("recall_baseline", "recall_cleaned", "delta", "ci_low", "ci_high"):
            v = r.get(k)
            row[k] = None if v is None or pd.isna(v) else float(v)
        row["verdict"] = verdict(row["ci_low"], row["ci_high"])
        classes.append(row)
    return {"verdict": ba["verdict"], "balanced_accuracy": ba, "top_issue_classes": classes}


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def describe(decision: dict, *, confidence: float, n_seeds: int, n_test: int) -> str:
    """One line a person reads: the verdict, the delta, what the interval covers, and the top classes."""
    ba = decision["balanced_accuracy"]
    seeds = f"{n_seeds} seed pair{'s' if n_seeds != 1 else ''}"
    line = (f"{decision['verdict'].upper()}: balanced accuracy {_pts(ba['delta'])} pts "
            f"({confidence:.0%} CI {_pts(ba['ci_low'])} .. {_pts(ba['ci_high'])}; paired bootstrap over "
            f"{n_test} test rows and {seeds})")
    if decision["top_issue_classes"]:
        line += "; most-flagged classes: " + ", ".join(
            f"{c['class']} {c['verdict']} ({_pts(c['delta'])} [{_pts(c['ci_low'])}, {_pts(c['ci_high'])}])"
            for c in decision["top_issue_classes"])
    return line


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


NOTE_MAX_CHARS = 7500  # MLflow keeps a tag value up to 8000 characters


def markdown(text: str, recall: list[dict], *, links: dict[str, str] | None = None, confidence: float = 0.95,
             max_chars: int = NOTE_MAX_CHARS) -> str:
    """The run description (MLflow's ``mlflow.note.content``): the verdict sentence, the per-class table
    (recall baseline -> cleaned, delta [CI], issue rate, test n) and links to the pictures.

    ``recall``: rows of the recall-deltas table (``class, recall_baseline, recall_cleaned, delta,
    ci_low, ci_high, issue_rate`` and ``n_test`` when known); ``links``: {label: URL or path}.
    Rows past ``max_chars`` (many classes) are left out, saying how many (they are in recall_deltas.csv).
    """
    def cell(v) -> str:
        return str(v).replace("|", "\\|")

    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    lines = [f"**{cell(text)}**", "",
             f"| class | recall baseline → cleaned | delta [{confidence:.0%} CI] (pts) | issue rate | test n |",
             "|---|---|---|---|---|"]
    link_lines = [f"- {cell(label)}: [{cell(_link_text(url))}]({url})" for label, url in (links or {}).items()]
    budget = max_chars - len(text) - sum(len(x) + 1 for x in link_lines) - 300
    for i, r in enumerate(recall):
        n = r.get("n_test")
        if sum(len(x) + 1 for x in lines) > budget:
            lines.append(f"| … {len(recall) - i} more classes: see recall_deltas.csv | | | | |")
            break
        lines.append(
            f"| {cell(r['class'])} | {_pct(num(r.get('recall_baseline')))} → {_pct(num(r.get('recall_cleaned')))} | "
            f"{_pts(num(r.get('delta')))} [{_pts(num(r.get('ci_low')))}, {_pts(num(r.get('ci_high')))}] | "
            f"{_pct(num(r.get('issue_rate')))} | {'n/a' if n is None or num(n) is None else int(n)} |")
    if link_lines:
        lines += ["", *link_lines]
    return "\n".join(lines) + "\n"


def _link_text(url: str) -> str:
    """A link's visible text: its last path part."""
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or url
