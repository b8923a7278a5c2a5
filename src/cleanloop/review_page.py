"""The review page (``cleanloop review``): which flagged rows it shows, and the HTML that shows them.

``flagged_rows`` picks and orders the rows, ``top_classes`` ranks each row's classes,
``thumb_name`` names a thumbnail file, ``script_json`` embeds data in a ``<script>`` safely and
``page_html`` writes the page. No function here reads or writes a file: the step does.

The page is one HTML file (inline CSS and JS, no network, works from ``file://``) that reads its
thumbnails from ``thumbs/`` beside it, or, in the copy logged to MLflow, carries them as ``data:``
URIs (``thumb_urls``): MLflow's artifact viewer shows an HTML file in an iframe loaded from a
``blob:`` URL with ``sandbox="allow-scripts"``, where a relative ``thumbs/...`` address resolves to
nothing, localStorage throws and downloads are blocked. The page's script runs there; it keeps
decisions in memory and, when framed, shows the exported CSV as text to copy. Every name and path reaches
the page either through :func:`html.escape` or as JSON that the script puts into the DOM with
``textContent``, never as markup; a Content-Security-Policy allows only the page's own script
(by hash) and no network at all.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from urllib.parse import quote

import numpy as np
import pandas as pd

from cleanloop.errors import CleanloopError

ISSUE_COLUMNS = ("image_uuid", "given_label", "predicted_label", "label_quality", "is_label_issue",
                 "outlier_score", "is_outlier")
ROW_FIELDS = ("uuid", "thumb", "w", "h", "given", "pred", "quality", "issue", "outlier", "oscore", "top", "src",
              "split", "copy")
SPLITS = ("train", "test")  # a row's ``split`` field: its index here (the test rows get a tab of their own)
_TRUE = {"true", "1", "yes", "t", "y"}


def _as_bool(col: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(col):
        return col.astype(bool)
    return col.astype(str).str.strip().str.lower().isin(_TRUE)


def flagged_rows(issues: pd.DataFrame, *, max_rows: int = 0, source: str = "label_issues.csv") -> pd.DataFrame:
    """The rows a reviewer sees: ``is_label_issue``, ``is_outlier`` or ``is_conflicting_copy`` (a column
    the flag step adds when the audit has run), lowest ``label_quality`` first.

    Parameters
    ----------
    issues : the flag step's table (CONTRACT §3 ``flag/label_issues.csv``), N scored rows, with at
        least the columns of ``ISSUE_COLUMNS``; flags may be booleans or ``"True"``/``"False"`` text.
    max_rows : 0 for every flagged row, else only the ``max_rows`` lowest label_quality.
    source : the file name used in messages.

    Returns
    -------
    DataFrame of the flagged rows (M <= N), sorted by label_quality then image_uuid, index reset;
    the flags as booleans and the scores as floats.
    """
    missing = [c for c in ISSUE_COLUMNS if c not in issues.columns]
    if missing:
        raise CleanloopError(f"{source}: missing column(s) {', '.join(missing)}; the review page needs "
                             f"{', '.join(ISSUE_COLUMNS)} (the output of `cleanloop flag`)")
    if max_rows < 0:
        raise CleanloopError(f"review.max_rows={max_rows} must be 0 (every flagged row) or a positive count")
    df = issues.copy()
    df["image_uuid"] = df["image_uuid"].astype(str)
    df["is_label_issue"] = _as_bool(df["is_label_issue"])
    df["is_outlier"] = _as_bool(df["is_outlier"])
    copies = _as_bool(df["is_conflicting_copy"]) if "is_conflicting_copy" in df.columns else False
    df["is_conflicting_copy"] = copies
    df["copy_labels"] = df["copy_labels"].fillna("").astype(str) if "copy_labels" in df.columns else ""
    for col in ("label_quality", "outlier_score"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    bad = df["label_quality"].isna()
    if bad.any():
        raise CleanloopError(f"{source}: label_quality missing or not a number for {int(bad.sum())} row(s), "
                             f"first image_uuid {df.loc[bad, 'image_uuid'].iloc[0]!r}; rerun `cleanloop flag`")
    df = df[df["is_label_issue"] | df["is_outlier"] | df["is_conflicting_copy"]]
    df = df.sort_values(["label_quality", "image_uuid"], kind="mergesort").reset_index(drop=True)
    return df.head(max_rows).reset_index(drop=True) if max_rows else df


def top_classes(pred_probs: np.ndarray, *, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of each row, best first.

    Parameters
    ----------
    pred_probs : array, shape (N, K)
    k : how many classes (at most K).

    Returns
    -------
    (indices, probs), each shape (N, min(k, K)); ties keep the class order.
    """
    probs = np.asarray(pred_probs, dtype=np.float64)
    if probs.ndim != 2:
        raise CleanloopError(f"pred_probs must be 2-D (N rows, K classes), got shape {probs.shape}")
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def thumb_name(image_uuid: str, *, size: int, ext: str) -> str:
    """The thumbnail's file name: a hash of the image_uuid (which may hold slashes or markup)."""
    digest = hashlib.sha1(str(image_uuid).encode("utf-8")).hexdigest()[:20]
    return f"{digest}-{size}{ext}"


_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def data_uri(name: str, data: bytes) -> str:
    """A thumbnail's bytes as a ``data:`` URI, its type from the file name (``.png`` or ``.jpg``)."""
    kind = _IMAGE_TYPES.get(name[name.rfind("."):].lower() if "." in name else "")
    if kind is None:
        raise CleanloopError(f"thumbnail {name!r}: not a .png or .jpg file; the review step writes only those")
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _thumb_url(name: str | None, urls: Mapping[str, str] | None) -> str | None:
    if name is None:
        return None  # unreadable image
    if urls is None:
        return "thumbs/" + quote(name)
    return urls.get(name, "")  # "" = not embedded in this copy


def script_json(obj) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>``, ``&`` and JS line separators become ``\\uXXXX``.

    Those characters only ever occur inside JSON strings, where the escapes mean the same text,
    so ``</script>`` in a class name cannot end the script element.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _num(x, digits: int = 5):
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def page_rows(flagged: pd.DataFrame, pred_probs: np.ndarray, *, classes: Sequence[str],
              thumbs: Sequence[tuple[str | None, int, int]], sources: Sequence[str], k: int = 3,
              split: str = "train") -> list[list]:
    """The page's rows as compact lists in the order of ``ROW_FIELDS`` (classes by index).

    Parameters
    ----------
    flagged : the output of :func:`flagged_rows`, M rows.
    pred_probs : shape (M, K), the rows' probabilities in ``classes`` order.
    classes : the K class names.
    thumbs : per row (file name in thumbs/ or None when the image was unreadable, width, height).
    sources : per row, a link to the original image (a ``file:`` URI), or "".
    split : ``train`` (the flag step's rows, scored out of fold) or ``test`` (flag.split=test: scored
        by the baseline model(s)); the page shows each in a tab of its own.
    """
    if split not in SPLITS:
        raise CleanloopError(f"page_rows: split={split!r}, expected one of {', '.join(SPLITS)}")
    if not (len(flagged) == len(pred_probs) == len(thumbs) == len(sources)):
        raise CleanloopError(f"page_rows: {len(flagged)} rows but {len(pred_probs)} probability rows, "
                             f"{len(thumbs)} thumbnails, {len(sources)} sources")
    index = {str(c): i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for col in ("given_label", "predicted_label") for v in flagged[col]} - set(index))
    if unknown:
        raise CleanloopError(f"label_issues.csv names class(es) {unknown[:5]} that the manifest does not have; "
                             "rerun `cleanloop flag` on this manifest")
    order, probs = top_classes(pred_probs, k=k) if len(flagged) else (np.zeros((0, 0), int), np.zeros((0, 0)))
    copies = flagged["is_conflicting_copy"] if "is_conflicting_copy" in flagged.columns else [False] * len(flagged)
    copy_labels = flagged["copy_labels"] if "copy_labels" in flagged.columns else [""] * len(flagged)
    out = []
    for i, row in enumerate(flagged.itertuples(index=False)):
        name, w, h = thumbs[i]
        top = [[int(c), _num(p, 4)] for c, p in zip(order[i], probs[i], strict=True)]
        # a conflicting copy: the labels its copies carry ("a|b"), shown on its card; "" otherwise
        copy = (str(copy_labels.iloc[i] if hasattr(copy_labels, "iloc") else copy_labels[i]) or "?") \
            if bool(copies.iloc[i] if hasattr(copies, "iloc") else copies[i]) else ""
        out.append([row.image_uuid, name, int(w), int(h), index[str(row.given_label)],
                    index[str(row.predicted_label)], _num(row.label_quality), int(bool(row.is_label_issue)),
                    int(bool(row.is_outlier)), _num(row.outlier_score, 4), top, sources[i], SPLITS.index(split),
                    copy])
    return out


def page_html(
    rows: list[list],
    *,
    classes: Sequence[str],
    title: str,
    details: Mapping[str, str],
    storage_key: str,
    initial: Mapping[str, tuple[str, str]] | None = None,
    thumb_size: int = 224,
    thumb_urls: Mapping[str, str] | None = None,
) -> str:
    """The review page as one HTML string.

    Parameters
    ----------
    rows : the output of :func:`page_rows`.
    classes : the K class names (the order ``rows`` index into).
    title : e.g. the dataset name; shown in the heading.
    details : label -> text lines under the heading (where the rows came from, the flag run).
    storage_key : names the page's decisions in the browser's localStorage; keep it stable across
        re-renders of the same review so decisions survive a new page.
    initial : image_uuid -> (decision, reviewer_note) to start from (a decisions file given to
        the step); the browser's own saved decisions win once it has any.
    thumb_size : the thumbnails' longest side, in pixels (the card's image box).
    thumb_urls : None for a page beside its ``thumbs/`` folder (each image at ``thumbs/<name>``);
        else thumbnail file name -> the address to use instead (a :func:`data_uri`, for a copy that
        needs no folder); a row whose thumbnail is not in it says "not embedded" instead.
    """
    rows = [[r[0], _thumb_url(r[1], thumb_urls), *r[2:]] for r in rows]
    data = {"classes": [str(c) for c in classes], "columns": list(ROW_FIELDS), "rows": rows,
            "storage_key": storage_key, "thumb_size": int(thumb_size),
            "initial": [[str(u), str(d), str(n)] for u, (d, n) in (initial or {}).items()]}
    script = _JS
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    csp = ("default-src 'none'; img-src 'self' file: data: blob:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'")
    detail_html = "".join(f"<span><b>{html.escape(k)}</b> {html.escape(str(v))}</span>" for k, v in details.items())
    return _HTML.format(
        csp=html.escape(csp), title=html.escape(title), css=_CSS.replace("THUMB", str(int(thumb_size))),
        details=detail_html, keys=_KEYS_HTML, data=script_json(data), script=script,
    )


_KEYS_HTML = (
    "<kbd>j</kbd>/<kbd>k</kbd> or <kbd>&darr;</kbd>/<kbd>&uarr;</kbd> next / previous"
    " &middot; <kbd>a</kbd> keep (label is right) &middot; <kbd>d</kbd> drop"
    " &middot; <kbd>r</kbd> relabel to the model&rsquo;s pick"
    " &middot; <kbd>1</kbd> <kbd>2</kbd> <kbd>3</kbd> relabel to the model&rsquo;s 1st / 2nd / 3rd class"
    " &middot; <kbd>u</kbd> undo &middot; <kbd>n</kbd> note, exported with the decision (<kbd>Enter</kbd> done)"
    " &middot; <kbd>c</kbd> cards / clusters &middot; <kbd>t</kbd> train / test rows &middot; <kbd>e</kbd> export"
    " &middot; <kbd>?</kbd> hide keys"
)

_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>cleanloop review: {title}</title>
<style>{css}</style>
</head>
<body>
<header id="top">
  <div class="bar">
    <h1>cleanloop review <span class="ds">{title}</span></h1>
    <span id="stats" class="stats"></span>
    <span class="grow"></span>
    <span class="views" id="tabs" hidden><button id="t-train" class="on" type="button">Train rows</button><button id="t-test" type="button" title="test rows scored by the baseline model(s): decisions here correct the test split (compare.test_decisions), never the training set">Test rows</button></span>
    <span class="views"><button id="v-cards" class="on" type="button">Cards</button><button id="v-clusters" type="button">Clusters</button></span>
    <button id="export" class="primary" type="button">Export decisions.csv</button>
    <button id="clear-all" type="button" title="forget every decision on this page">Clear decisions</button>
  </div>
  <div class="bar filters">
    <label>Given <select id="f-given"><option value="">all classes</option></select></label>
    <label>Predicted <select id="f-pred"><option value="">all classes</option></select></label>
    <label>Issue <select id="f-kind"><option value="">any issue</option><option value="issue">label issue</option><option value="outlier">outlier</option><option value="copy">conflicting copy</option></select></label>
    <label>Decision <select id="f-status"><option value="">any</option><option value="none">undecided</option><option value="any">decided</option><option value="keep">keep</option><option value="drop">drop</option><option value="relabel">relabel</option></select></label>
    <button id="clear-filters" type="button">Clear filters</button>
    <label class="check"><input type="checkbox" id="advance" checked> next card after deciding</label>
  </div>
  <div class="keys" id="keys">Keys: {keys}</div>
  <div class="details">{details}</div>
  <div id="warn" class="warn" hidden></div>
</header>
<main>
  <section id="cards-view">
    <div id="grid" class="grid"></div>
    <div id="more" class="more"></div>
    <p id="empty" class="empty" hidden>No flagged rows match these filters.</p>
  </section>
  <section id="clusters-view" hidden>
    <p class="hint">Flagged rows grouped by given &rarr; predicted label, largest group first. Click a group to review it.</p>
    <div id="clusters"></div>
  </section>
</main>
<section id="export-box" class="export-box" hidden>
  <p>Exported decisions.csv. A browser frame that blocks downloads (MLflow&rsquo;s artifact viewer does)
  saves nothing: copy this text into a file called decisions.csv.</p>
  <textarea id="export-text" readonly spellcheck="false"></textarea>
  <button id="export-close" type="button">Close</button>
</section>
<a id="export-link" hidden></a>
<script type="application/json" id="review-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_CSS = """
:root { --hdr: 150px; --ink: #1f2933; --muted: #66788a; --line: #d5dbe1; --keep: #15803d; --drop: #c62828;
  --relabel: #6d28d9; --focus: #1d4ed8; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
  background: #f3f5f7; }
header { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
  padding: 8px 16px 6px; box-shadow: 0 1px 4px rgba(0,0,0,.06); }
.bar { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 14px; }
.grow { flex: 1; }
h1 { font-size: 18px; margin: 0; font-weight: 650; }
h1 .ds { color: var(--muted); font-weight: 500; margin-left: 6px; }
.stats { color: var(--muted); }
.stats b { color: var(--ink); }
.filters { margin-top: 6px; }
.filters label { color: var(--muted); }
select, button, input[type=text] { font: inherit; color: var(--ink); }
select { padding: 3px 4px; border: 1px solid var(--line); border-radius: 6px; background: #fff; max-width: 220px; }
button { padding: 4px 10px; border: 1px solid var(--line); border-radius: 6px; background: #fff; cursor: pointer; }
button:hover { border-color: #9aa5b1; }
button.primary { background: var(--focus); color: #fff; border-color: var(--focus); }
.views button { border-radius: 0; }
.views button:first-child { border-radius: 6px 0 0 6px; }
.views button:last-child { border-radius: 0 6px 6px 0; border-left: 0; }
.views button.on { background: #e8eefc; border-color: var(--focus); }
.check { user-select: none; }
.keys { margin-top: 6px; color: var(--muted); font-size: 12.5px; }
kbd { display: inline-block; min-width: 1.5em; padding: 0 4px; border: 1px solid #b8c2cc; border-bottom-width: 2px;
  border-radius: 4px; background: #f8fafc; font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; text-align: center;
  color: var(--ink); }
.details { margin-top: 4px; color: var(--muted); font-size: 12px; display: flex; flex-wrap: wrap; gap: 2px 16px;
  overflow-wrap: anywhere; }
.details b { font-weight: 600; }
.warn { margin-top: 6px; padding: 4px 8px; background: #fff4e5; border: 1px solid #f5c07a; border-radius: 6px; }
main { padding: 14px 16px 40px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
.card { background: #fff; border: 2px solid var(--line); border-radius: 10px; padding: 8px; display: flex;
  flex-direction: column; gap: 6px; scroll-margin-top: calc(var(--hdr) + 8px); scroll-margin-bottom: 16px;
  cursor: default; }
.card.current { outline: 3px solid var(--focus); outline-offset: 1px; }
.card.keep { border-color: var(--keep); background: #f0fbf3; }
.card.drop { border-color: var(--drop); background: #fdf1f1; }
.card.drop .imgbox img { opacity: .45; }
.card.relabel { border-color: var(--relabel); background: #f6f2fe; }
.imgbox { height: THUMBpx; display: flex; align-items: center; justify-content: center; background: #1b1f24;
  border-radius: 6px; overflow: hidden; position: relative; }
.imgbox img { width: THUMBpx; height: THUMBpx; object-fit: contain; }
.imgbox img.pixelated { image-rendering: pixelated; }
.imgbox .noimg { color: #fbd5d5; }
.badge { position: absolute; top: 6px; right: 6px; padding: 1px 8px; border-radius: 10px; font-weight: 650;
  font-size: 12px; color: #fff; display: none; }
.card.keep .badge { display: block; background: var(--keep); }
.card.drop .badge { display: block; background: var(--drop); }
.card.relabel .badge { display: block; background: var(--relabel); }
.pos { position: absolute; top: 6px; left: 6px; padding: 0 6px; border-radius: 8px; font-size: 11px;
  background: rgba(0,0,0,.55); color: #fff; }
.given { font-size: 15px; }
.given .lab, .tops .lab { font-weight: 650; overflow-wrap: anywhere; }
.kinds { display: flex; gap: 6px; flex-wrap: wrap; align-items: center; color: var(--muted); font-size: 12.5px; }
.tag { padding: 0 6px; border-radius: 8px; font-size: 11.5px; font-weight: 600; }
.tag.issue { background: #fde8e8; color: #9b1c1c; }
.tag.outlier { background: #fff1d6; color: #8a4b00; }
.tag.copy { background: #e0f2fe; color: #075985; }
.tops { list-style: none; margin: 0; padding: 0; display: flex; flex-direction: column; gap: 2px; }
.tops li { display: grid; grid-template-columns: auto minmax(0, 1fr) 70px 44px; gap: 6px; align-items: center;
  padding: 1px 4px; border-radius: 5px; cursor: pointer; }
.tops li:hover { background: #eef2f7; }
.tops li.is-given { color: var(--muted); }
.tops li.chosen { background: #ebe3fd; }
.tops .lab { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tops .barw { height: 8px; background: #e4e8ec; border-radius: 4px; overflow: hidden; }
.tops .barw i { display: block; height: 100%; background: #5b7fb8; }
.tops .p { text-align: right; font-variant-numeric: tabular-nums; }
.actions { display: flex; gap: 6px; flex-wrap: wrap; align-items: center; }
.actions button { padding: 3px 8px; }
.actions button.keep.on { background: var(--keep); color: #fff; border-color: var(--keep); }
.actions button.drop.on { background: var(--drop); color: #fff; border-color: var(--drop); }
.actions select.on { background: var(--relabel); color: #fff; border-color: var(--relabel); }
.actions select { max-width: 140px; }
.note { width: 100%; padding: 3px 6px; border: 1px solid var(--line); border-radius: 6px; font-size: 12.5px; }
.meta { color: var(--muted); font-size: 11.5px; display: flex; gap: 8px; min-width: 0; }
.meta .uuid { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; flex: 1; min-width: 0; }
.meta a { color: var(--muted); }
.more, .empty { text-align: center; color: var(--muted); padding: 16px; }
.hint { color: var(--muted); margin: 0 0 10px; }
.cluster { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 8px 10px; margin-bottom: 10px;
  cursor: pointer; }
.cluster:hover { border-color: var(--focus); }
.cluster .head { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; }
.cluster .pair { font-size: 15px; font-weight: 650; overflow-wrap: anywhere; }
.cluster .n { font-size: 15px; font-weight: 650; color: var(--focus); }
.cluster .sub { color: var(--muted); font-size: 12.5px; }
.strip { display: flex; gap: 4px; margin-top: 6px; overflow: hidden; }
.strip img { width: 72px; height: 72px; object-fit: contain; background: #1b1f24; border-radius: 4px; flex: none; }
.strip img.pixelated { image-rendering: pixelated; }
.export-box { position: fixed; left: 16px; right: 16px; bottom: 16px; z-index: 10; background: #fff;
  border: 2px solid var(--focus); border-radius: 10px; padding: 8px 12px; box-shadow: 0 4px 16px rgba(0,0,0,.2); }
.export-box p { margin: 0 0 6px; }
.export-box textarea { width: 100%; height: 160px; font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
"""

_JS = r"""
(() => {
"use strict";
const t0 = performance.now();
const $ = (id) => document.getElementById(id);
const D = JSON.parse($("review-data").textContent);
const C = D.classes;
const rows = D.rows.map((r) => { const o = {}; D.columns.forEach((c, i) => { o[c] = r[i]; }); return o; });
const CHUNK = 48;
const SMALL = 112;  // thumbnails smaller than this are drawn with crisp pixels
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; };
const fmt = (x, d) => (x === null || x === undefined) ? "n/a" : Number(x).toFixed(d);
// In a frame (MLflow's artifact viewer: a sandboxed iframe) a download may be blocked: show the CSV too.
const FRAMED = (() => { try { return window.top !== window.self; } catch (e) { return true; } })();

// ---- decisions: uuid -> {decision, note}, saved in localStorage under the page's key -----------------
const decisions = new Map();
let canStore = true;
function warn(text) { const w = $("warn"); w.textContent = text; w.hidden = false; }
function save() {
  if (!canStore) return;
  try {
    const entries = [];
    decisions.forEach((v, u) => entries.push([u, v.decision || "", v.note || ""]));
    localStorage.setItem(D.storage_key, JSON.stringify({ version: 1, seeded: true, entries }));
  } catch (e) {
    canStore = false;
    warn("This browser does not keep decisions for this page (" + e.name + "): export decisions.csv before closing it.");
  }
}
(function load() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(D.storage_key) || "null"); } catch (e) { canStore = false; }
  if (!canStore) warn("This browser does not keep decisions for this page: export decisions.csv before closing it.");
  const entries = saved && saved.seeded ? saved.entries : D.initial;
  for (const [u, d, n] of entries || []) decisions.set(String(u), { decision: String(d || ""), note: String(n || "") });
})();
const decisionOf = (r) => (decisions.get(r.uuid) || {}).decision || "";
const kindOf = (d) => d.startsWith("relabel:") ? "relabel" : d;

// ---- filters ---------------------------------------------------------------------------------
const F = { given: $("f-given"), pred: $("f-pred"), kind: $("f-kind"), status: $("f-status") };
(function fillClassFilters() {
  const nGiven = new Array(C.length).fill(0), nPred = new Array(C.length).fill(0);
  for (const r of rows) { nGiven[r.given]++; nPred[r.pred]++; }
  C.forEach((c, i) => {
    if (nGiven[i]) { const o = el("option", "", c + " (" + nGiven[i] + ")"); o.value = String(i); F.given.append(o); }
    if (nPred[i]) { const o = el("option", "", c + " (" + nPred[i] + ")"); o.value = String(i); F.pred.append(o); }
  });
})();
let tab = 0;         // the rows shown: 0 train, 1 test (SPLITS); the test tab exists when test rows were flagged
const HAS_TEST = rows.some((r) => r.split === 1);
let filtered = [];   // indices into rows, in page order (lowest label quality first)
let cur = 0;         // position in filtered of the current card
let rendered = 0;    // cards in the grid so far (rendered in chunks as you scroll or move)
const cards = [];    // card elements by position in filtered

function matches(r, g, p, k, s) {
  if (r.split !== tab) return false;
  if (g !== "" && r.given !== +g) return false;
  if (p !== "" && r.pred !== +p) return false;
  if (k === "issue" && !r.issue) return false;
  if (k === "outlier" && !r.outlier) return false;
  if (k === "copy" && !r.copy) return false;
  if (s !== "") {
    const d = kindOf(decisionOf(r));
    if (s === "none" ? d !== "" : s === "any" ? d === "" : d !== s) return false;
  }
  return true;
}
function applyFilters() {
  const g = F.given.value, p = F.pred.value, k = F.kind.value, s = F.status.value;
  filtered = [];
  for (let i = 0; i < rows.length; i++) if (matches(rows[i], g, p, k, s)) filtered.push(i);
  cur = 0; rendered = 0; cards.length = 0;
  $("grid").replaceChildren();
  renderMore(CHUNK);
  setCurrent(0, false);
  updateStats();
  $("empty").hidden = filtered.length > 0;
  window.scrollTo(0, 0);
}

// ---- cards -----------------------------------------------------------------------------------
function thumbImg(r, cls) {
  const img = el("img", cls || "");
  img.loading = "lazy"; img.decoding = "async"; img.alt = r.uuid;
  if (Math.max(r.w, r.h) < SMALL) img.classList.add("pixelated");
  img.src = r.thumb;  // a file in the folder beside the page, or a data: URI in the self-contained copy
  return img;
}
function card(r, pos) {
  const c = el("article", "card"); c.dataset.pos = String(pos); c.dataset.uuid = r.uuid;
  const box = el("div", "imgbox");
  if (r.thumb) box.append(thumbImg(r));
  else box.append(el("span", "noimg", r.thumb === "" ? "thumbnail not embedded in this copy" : "image could not be read"));
  box.append(el("span", "pos", "#" + (pos + 1)), el("span", "badge"));
  const given = el("div", "given"); given.append("given ", el("span", "lab", C[r.given]));
  const kinds = el("div", "kinds");
  kinds.append(el("span", "", "quality " + fmt(r.quality, 3)));
  if (r.issue) kinds.append(el("span", "tag issue", "label issue"));
  if (r.outlier) kinds.append(el("span", "tag outlier", "outlier " + fmt(r.oscore, 2)));
  if (r.copy) { const t = el("span", "tag copy", "conflicting copy"); t.title = "a copy of it carries another label: " + r.copy.split("|").join(", "); kinds.append(t); }
  const tops = el("ol", "tops");
  r.top.forEach(([ci, p], j) => {
    const li = el("li"); li.dataset.cls = String(ci);
    if (ci === r.given) li.classList.add("is-given");
    const bar = el("span", "barw"); const fill = el("i"); fill.style.width = (100 * (p || 0)).toFixed(1) + "%";
    bar.append(fill);
    const kb = el("kbd", "", String(j + 1));
    li.title = ci === r.given ? "the given label: keep (" + (j + 1) + ")" : "relabel to this class (" + (j + 1) + ")";
    li.append(kb, el("span", "lab", C[ci]), bar, el("span", "p", fmt(p, 2)));
    tops.append(li);
  });
  const acts = el("div", "actions");
  const keep = el("button", "keep", "Keep"); keep.type = "button"; keep.dataset.act = "keep"; keep.title = "keep the given label (a)";
  const drop = el("button", "drop", "Drop"); drop.type = "button"; drop.dataset.act = "drop"; drop.title = "drop from training (d)";
  const sel = el("select", "relabel"); sel.title = "relabel to another class (r: the model's pick)";
  sel.append(el("option", "", "Relabel to\u2026"));
  sel.firstChild.value = "";
  C.forEach((name, i) => { if (i !== r.given) { const o = el("option", "", name); o.value = String(i); sel.append(o); } });
  acts.append(keep, drop, sel);
  const note = el("input", "note"); note.type = "text"; note.placeholder = "reviewer note (n)";
  const meta = el("div", "meta");
  const uu = el("span", "uuid", r.uuid); uu.title = r.uuid;
  meta.append(uu);
  if (r.src) { const a = el("a", "", "original"); a.href = r.src; a.target = "_blank"; a.rel = "noopener"; meta.append(a); }
  c.append(box, given, kinds, tops, acts, note, meta);
  paint(c, r);
  return c;
}
function paint(c, r) {
  const e = decisions.get(r.uuid) || {};
  const d = e.decision || "", kind = kindOf(d);
  c.classList.remove("keep", "drop", "relabel");
  if (kind) c.classList.add(kind);
  c.querySelector(".badge").textContent = kind === "relabel" ? "\u2192 " + d.slice(8) : kind;
  c.querySelector("button.keep").classList.toggle("on", kind === "keep");
  c.querySelector("button.drop").classList.toggle("on", kind === "drop");
  const sel = c.querySelector("select.relabel");
  const target = kind === "relabel" ? C.indexOf(d.slice(8)) : -1;
  sel.value = target >= 0 ? String(target) : "";
  sel.classList.toggle("on", target >= 0);
  c.querySelectorAll(".tops li").forEach((li) => li.classList.toggle("chosen", +li.dataset.cls === target));
  const note = c.querySelector(".note");
  if (document.activeElement !== note) note.value = e.note || "";
}
function renderMore(upto) {
  const end = Math.min(filtered.length, Math.max(upto, rendered));
  if (end <= rendered) return;
  const frag = document.createDocumentFragment();
  for (let i = rendered; i < end; i++) { const c = card(rows[filtered[i]], i); cards[i] = c; frag.append(c); }
  $("grid").append(frag);
  rendered = end;
  $("more").textContent = rendered < filtered.length ? "showing " + rendered + " of " + filtered.length + ", scroll for more" : "";
}
new IntersectionObserver((es) => { if (es.some((e) => e.isIntersecting)) renderMore(rendered + CHUNK); },
  { rootMargin: "1200px 0px" }).observe($("more"));

function setCurrent(pos, scroll) {
  if (!filtered.length) return;
  pos = Math.max(0, Math.min(filtered.length - 1, pos));
  if (pos >= rendered) renderMore(pos + CHUNK);
  if (cards[cur]) cards[cur].classList.remove("current");
  cur = pos;
  cards[cur].classList.add("current");
  if (scroll) cards[cur].scrollIntoView({ block: "nearest" });
}

// ---- deciding --------------------------------------------------------------------------------
function decide(pos, decision, advance) {
  if (!filtered.length) return;
  const r = rows[filtered[pos]];
  const e = decisions.get(r.uuid) || { decision: "", note: "" };
  e.decision = decision;
  if (!e.decision && !e.note) decisions.delete(r.uuid); else decisions.set(r.uuid, e);
  save();
  if (cards[pos]) paint(cards[pos], r);
  updateStats();
  if (advance && decision && $("advance").checked) setCurrent(pos + 1, true);
}
function relabel(pos, ci, advance) {
  const r = rows[filtered[pos]];
  // A relabel to the given label is a keep (prune reads it that way too).
  decide(pos, ci === r.given ? "keep" : "relabel:" + C[ci], advance);
}
function suggestion(r) {
  for (const [ci] of r.top) if (ci !== r.given) return ci;
  return -1;
}
function setNote(pos, text) {
  const r = rows[filtered[pos]];
  const e = decisions.get(r.uuid) || { decision: "", note: "" };
  e.note = text;
  if (!e.decision && !e.note) decisions.delete(r.uuid); else decisions.set(r.uuid, e);
  save();
}
$("grid").addEventListener("click", (ev) => {
  const c = ev.target.closest(".card"); if (!c) return;
  const pos = +c.dataset.pos;
  setCurrent(pos, false);
  const act = ev.target.closest("[data-act]");
  if (act) { decide(pos, act.classList.contains("on") ? "" : act.dataset.act, false); return; }
  const li = ev.target.closest(".tops li");
  if (li) relabel(pos, +li.dataset.cls, false);
});
$("grid").addEventListener("change", (ev) => {
  if (!ev.target.matches("select.relabel")) return;
  const pos = +ev.target.closest(".card").dataset.pos;
  if (ev.target.value === "") decide(pos, "", false); else relabel(pos, +ev.target.value, false);
  ev.target.blur();
});
$("grid").addEventListener("input", (ev) => {
  if (ev.target.matches(".note")) setNote(+ev.target.closest(".card").dataset.pos, ev.target.value);
});
$("grid").addEventListener("focusin", (ev) => {
  const c = ev.target.closest(".card"); if (c) setCurrent(+c.dataset.pos, false);
});

// ---- counts, clusters, export ------------------------------------------------------------------
function updateStats() {
  let keep = 0, drop = 0, rel = 0;
  let n = 0;
  for (const r of rows) {
    if (r.split !== tab) continue;
    n++;
    const k = kindOf(decisionOf(r)); if (k === "keep") keep++; else if (k === "drop") drop++; else if (k === "relabel") rel++;
  }
  const s = $("stats"); s.replaceChildren();
  const b = (t) => el("b", "", String(t));
  s.append(b(n), " flagged " + (tab ? "test" : "train") + " rows \u00b7 showing ", b(filtered.length), " \u00b7 decided ",
           b(keep + drop + rel), " (keep " + keep + ", drop " + drop + ", relabel " + rel + ")");
}
function renderClusters() {
  const groups = new Map();
  rows.forEach((r, i) => {
    if (r.split !== tab) return;
    const key = r.given + "|" + r.pred;
    let g = groups.get(key);
    if (!g) { g = { given: r.given, pred: r.pred, n: 0, decided: 0, issues: 0, outliers: 0, sample: [] }; groups.set(key, g); }
    g.n++; if (decisionOf(r)) g.decided++; if (r.issue) g.issues++; if (r.outlier) g.outliers++;
    if (g.sample.length < 12) g.sample.push(i);
  });
  const list = [...groups.values()].sort((a, b) => b.n - a.n || C[a.given].localeCompare(C[b.given]));
  const box = $("clusters"); box.replaceChildren(); stripObserver.disconnect();
  for (const g of list) {
    const c = el("div", "cluster"); c.dataset.given = String(g.given); c.dataset.pred = String(g.pred);
    const head = el("div", "head");
    const pair = el("span", "pair", C[g.given] + " \u2192 " + (g.given === g.pred ? C[g.pred] + " (same class)" : C[g.pred]));
    head.append(pair, el("span", "n", String(g.n)),
      el("span", "sub", g.issues + " label issue(s), " + g.outliers + " outlier(s), " + g.decided + " decided"));
    const strip = el("div", "strip");
    strip.sample = g.sample;
    c.append(head, strip);
    box.append(c);
    stripObserver.observe(strip);
  }
}
// A group's thumbnails are added when it scrolls near the screen: K^2 groups can be thousands of images.
const stripObserver = new IntersectionObserver((es) => {
  for (const e of es) {
    if (!e.isIntersecting) continue;
    stripObserver.unobserve(e.target);
    for (const i of e.target.sample) if (rows[i].thumb) e.target.append(thumbImg(rows[i]));
  }
}, { rootMargin: "600px 0px" });
$("clusters").addEventListener("click", (ev) => {
  const c = ev.target.closest(".cluster"); if (!c) return;
  F.given.value = c.dataset.given; F.pred.value = c.dataset.pred; F.kind.value = ""; F.status.value = "";
  showView("cards"); applyFilters();
});
function showView(v) {
  const clusters = v === "clusters";
  $("cards-view").hidden = clusters; $("clusters-view").hidden = !clusters;
  $("v-cards").classList.toggle("on", !clusters); $("v-clusters").classList.toggle("on", clusters);
  if (clusters) renderClusters(); else { cards.forEach((c, i) => paint(c, rows[filtered[i]])); }
  window.scrollTo(0, 0);
}
function csvCell(v) {
  const s = String(v);
  return /[",\r\n]|^\s|\s$/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
}
function exportCsv() {
  const lines = ["image_uuid,decision,reviewer_note"];
  const seen = new Set();
  const add = (u, e) => { if (e && e.decision) lines.push([u, e.decision, e.note || ""].map(csvCell).join(",")); seen.add(u); };
  for (const r of rows) add(r.uuid, decisions.get(r.uuid));
  decisions.forEach((e, u) => { if (!seen.has(u)) add(u, e); });  // decided earlier, not on this page
  const url = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv;charset=utf-8" }));
  const a = $("export-link"); a.href = url; a.download = "decisions.csv"; a.click();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  if (FRAMED) { const t = $("export-text"); t.value = lines.join("\n") + "\n"; $("export-box").hidden = false; t.focus(); t.select(); }
}

// ---- wiring ----------------------------------------------------------------------------------
for (const s of Object.values(F)) s.addEventListener("change", () => { s.blur(); applyFilters(); });
$("clear-filters").addEventListener("click", () => { for (const s of Object.values(F)) s.value = ""; applyFilters(); });
$("v-cards").addEventListener("click", () => showView("cards"));
function showTab(t) {
  if (!HAS_TEST) return;
  tab = t;
  $("t-train").classList.toggle("on", t === 0); $("t-test").classList.toggle("on", t === 1);
  document.body.dataset.tab = t ? "test" : "train";
  if (!$("clusters-view").hidden) renderClusters();
  applyFilters();
}
if (HAS_TEST) {
  let nTrain = 0; for (const r of rows) if (r.split === 0) nTrain++;
  $("t-train").textContent = "Train rows (" + nTrain + ")";
  $("t-test").textContent = "Test rows (" + (rows.length - nTrain) + ")";
  $("tabs").hidden = false;
  $("t-train").addEventListener("click", () => showTab(0));
  $("t-test").addEventListener("click", () => showTab(1));
}
$("v-clusters").addEventListener("click", () => showView("clusters"));
$("export").addEventListener("click", exportCsv);
$("export-close").addEventListener("click", () => { $("export-box").hidden = true; });
$("clear-all").addEventListener("click", () => {
  if (!confirm("Forget every decision on this page?")) return;
  decisions.clear(); save(); cards.forEach((c, i) => paint(c, rows[filtered[i]])); updateStats();
});
$("advance").addEventListener("change", (ev) => ev.target.blur());
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const t = ev.target;
  if (t.matches && t.matches("input[type=text], textarea")) {
    if (ev.key === "Enter" || ev.key === "Escape") { ev.preventDefault(); t.blur(); }
    return;
  }
  if (t.matches && t.matches("select")) return;
  const inCards = !$("cards-view").hidden;
  const k = ev.key;
  let handled = true;
  if (k === "c") showView(inCards ? "clusters" : "cards");
  else if (k === "t" && HAS_TEST) showTab(1 - tab);
  else if (k === "e") exportCsv();
  else if (k === "?") $("keys").hidden = !$("keys").hidden;
  else if (!inCards || !filtered.length) handled = false;
  else if (k === "j" || k === "ArrowDown" || k === "ArrowRight") setCurrent(cur + 1, true);
  else if (k === "k" || k === "ArrowUp" || k === "ArrowLeft") setCurrent(cur - 1, true);
  else if (k === "a") decide(cur, "keep", true);
  else if (k === "d") decide(cur, "drop", true);
  else if (k === "u") decide(cur, "", false);
  else if (k === "r") { const ci = suggestion(rows[filtered[cur]]); if (ci >= 0) relabel(cur, ci, true); }
  else if (k === "1" || k === "2" || k === "3") {
    const top = rows[filtered[cur]].top[+k - 1]; if (top) relabel(cur, top[0], true);
  }
  else if (k === "n") { const n = cards[cur].querySelector(".note"); n.focus(); }
  else handled = false;
  if (handled) ev.preventDefault();
});
const fitHeader = () => document.documentElement.style.setProperty("--hdr", $("top").offsetHeight + "px");
window.addEventListener("resize", fitHeader);
fitHeader();
applyFilters();
window.reviewTimings = { ready_ms: performance.now() - t0 };
document.body.dataset.ready = "1";
})();
"""
