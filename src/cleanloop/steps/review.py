"""``cleanloop review``: a page for vetting the flagged rows by eye, its decisions fed back to ``prune``.

Reads ``flag/label_issues.csv`` (or ``review.issues``), the OOF parquet (``flag.oof`` or
``oof/oof_probs.parquet``) and the manifest; writes ``review/index.html`` with its thumbnails in
``review/thumbs/`` (one folder, no network: open it from disk), and ``review/screenshot.png``
when headless Chromium is at hand. A ``decisions.csv`` exported from the page, given as
``review.decisions`` (or ``prune.decisions``, or saved as ``review/decisions.csv``), is checked,
preloaded into the page and copied beside it. The page, its screenshot, summary and decisions
are logged to the flag run so a reviewed cleaning can be traced; the logged ``review/index.html``
is a self-contained copy with the thumbnails embedded as ``data:`` URIs (MLflow's artifact viewer
shows it in a sandboxed ``blob:`` iframe where ``thumbs/...`` cannot load), at most
``LOGGED_PAGE_MAX_BYTES``. ``cleanloop prune prune.decisions=...`` applies the decisions.

When the test rows have been flagged (``flag/test_label_issues.csv``, ``cleanloop flag
flag.split=test``), the page shows them in a tab of their own with the baseline's probabilities;
their decisions go into the same export, which ``compare.test_decisions`` reads (prune leaves
them alone).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from PIL import Image, ImageOps

from cleanloop.cleaning import normalise_rows
from cleanloop.config import file_hash
from cleanloop.errors import CleanloopError
from cleanloop.io import atomic_path, write_atomic, write_json
from cleanloop.oof_file import load_oof
from cleanloop.pruning import read_decisions
from cleanloop.review_page import data_uri, flagged_rows, page_html, page_rows, thumb_name
from cleanloop.steps.common import load_input, out_path, read_csv_strings
from cleanloop.steps.locate import flag_test_issues, issues_output, oof_input
from cleanloop.tracking import log_artifact_files, step_run

log = logging.getLogger(__name__)

# Headless Chromium without a sandbox (CI runs as root), a GPU or any network traffic of its own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The page logged to MLflow carries its thumbnails; past this size only the first rows' are embedded.
LOGGED_PAGE_MAX_BYTES = 20_000_000


# ---- thumbnails ---------------------------------------------------------------------------------


def _decode(path: str) -> Image.Image:
    """Upright RGB, as ``cleanloop.data.load_image`` decodes for training (without importing torch)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I", "F"):  # 16-bit / float grayscale: scale to 8 bits
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr / max(float(arr.max()), 1.0) * 255.0).clip(0, 255).astype(np.uint8))
        return img.convert("RGB")


def make_thumb(src: str, thumbs_dir: Path, image_uuid: str, *, size: int) -> tuple[str | None, int, int]:
    """Write (or reuse) the thumbnail of one image; return (file name, width, height), name None if unreadable.

    Images no larger than ``size`` are kept pixel for pixel as PNG (the page enlarges them with
    crisp pixels); larger ones are shrunk to ``size`` on the long side and written as JPEG.
    """
    for ext in (".png", ".jpg"):  # reuse a thumbnail newer than its image (a re-run is fast)
        done = thumbs_dir / thumb_name(image_uuid, size=size, ext=ext)
        try:
            if done.stat().st_mtime >= Path(src).stat().st_mtime:
                with Image.open(done) as im:
                    return done.name, im.width, im.height
        except (OSError, ValueError):
            pass
    try:
        img = _decode(src)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("review: %s: cannot decode image (%s: %s); its card says so", src, type(e).__name__, e)
        return None, size, size
    small = max(img.size) <= size
    if not small:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    ext, fmt, opts = (".png", "PNG", {}) if small else (".jpg", "JPEG", {"quality": 85})
    name = thumb_name(image_uuid, size=size, ext=ext)
    write_atomic(thumbs_dir / name, lambda p: img.save(p, format=fmt, **opts))
    return name, img.width, img.height


def write_thumbs(sources: list[str], uuids: list[str], thumbs_dir: Path, *, size: int, workers: int):
    """Thumbnails of every row (threads: PIL releases the GIL while decoding); stale ones removed."""
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        out = list(pool.map(lambda su: make_thumb(su[0], thumbs_dir, su[1], size=size), zip(sources, uuids, strict=True)))
    keep = {name for name, _, _ in out if name}
    for stale in thumbs_dir.iterdir():
        if stale.name not in keep:
            stale.unlink()
    return out


def embed_thumbs(thumbs, thumbs_dir: Path, *, budget: int) -> dict[str, str]:
    """Thumbnail file name -> ``data:`` URI, in row order, while their total length fits ``budget``.

    ``thumbs`` is :func:`write_thumbs`'s output (page order: lowest label quality first); the
    rows after the first one that does not fit get none, so the embedded ones are a prefix.
    """
    out: dict[str, str] = {}
    used = 0
    for name, _, _ in thumbs:
        if name is None or name in out:
            continue
        uri = data_uri(name, (thumbs_dir / name).read_bytes())
        if used + len(uri) > budget:
            break
        out[name] = uri
        used += len(uri)
    return out


# ---- screenshot ---------------------------------------------------------------------------------


def _poll(tab, predicate: str, *, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Call ``predicate`` in the page until it returns true (from Python: no eval inside the page)."""
    deadline = time.monotonic() + timeout_s
    while not tab.evaluate(predicate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        time.sleep(interval_s)


def _screenshot(page: Path, out: Path, chromium: str, viewport: tuple[int, int], timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=timeout_s * 1000)
        try:
            tab = browser.new_page(viewport={"width": int(viewport[0]), "height": int(viewport[1])})
            tab.set_default_timeout(timeout_s * 1000)
            tab.goto(page.resolve().as_uri())
            # Not wait_for_function("<string>"): Playwright re-evaluates a string predicate with eval,
            # which the page's Content-Security-Policy blocks after the first poll. A selector and a
            # Python-side poll of page.evaluate (sent over CDP, outside the page's CSP) are not blocked.
            tab.wait_for_selector("body[data-ready='1']", state="attached")
            # the thumbnails on the first screen, decoded (lazy ones further down do not count)
            _poll(tab, "() => [...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                       ".every(i => i.complete)", timeout_s=timeout_s, what="the first screen's thumbnails")
            with atomic_path(out) as tmp:
                tab.screenshot(path=str(tmp), type="png")
        finally:
            browser.close()


def take_screenshot(page: Path, out: Path, *, chromium: str, viewport: tuple[int, int],
                    timeout_s: float = 60) -> str | None:
    """Open ``page`` in headless Chromium and save a PNG of the first screen; the reason when it cannot.

    Uses the system browser at ``chromium`` (never one Playwright would download). Runs in its
    own thread: Playwright's sync API refuses a thread that already runs an event loop (a
    notebook, or a caller driving a browser itself).
    """
    if not Path(chromium).is_file():
        return f"no browser at review.chromium={chromium} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; its browser download is not needed)"
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(_screenshot, page, out, chromium, viewport, timeout_s).result()
    except Exception as e:  # a screenshot is a convenience: never fail the review over it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"headless Chromium failed ({type(e).__name__}: {first})"
    return None


# ---- the step -----------------------------------------------------------------------------------


def _flag_run_id(issues_path: Path) -> str | None:
    summary = issues_path.with_name("flag_summary.json")
    try:
        return json.loads(summary.read_text()).get("run_id") if summary.is_file() else None
    except (OSError, ValueError):
        return None


def _decisions_file(cfg: DictConfig, review_dir: Path) -> Path | None:
    given = cfg.review.get("decisions")
    if given:
        return Path(given)
    saved = review_dir / "decisions.csv"  # an export saved beside the page
    return saved if saved.is_file() else None


def _logged_page(rows, thumbs, thumbs_dir: Path, index: Path, details: dict, common: dict) -> tuple[str, int]:
    """The copy of the page logged to MLflow, thumbnails embedded up to ``LOGGED_PAGE_MAX_BYTES``; and how many."""
    n_thumbs = len({name for name, _, _ in thumbs if name})

    def render(urls: dict[str, str]) -> str:
        capped = len(urls) < n_thumbs
        note = (f"self-contained, for MLflow's artifact viewer: {len(urls)} of {n_thumbs} thumbnails embedded"
                + (f" (this copy is capped at {LOGGED_PAGE_MAX_BYTES / 1e6:g} MB: the first {len(urls)} rows, "
                   "lowest label quality first, have theirs; the rest say \"not embedded\")" if capped else "")
                + ". In the viewer decisions last until the page is closed and Export shows the CSV to copy. "
                  f"The page with every thumbnail: {index.resolve().as_uri()}")
        return page_html(rows, details={**details, "this copy": note}, thumb_urls=urls, **common)

    budget = LOGGED_PAGE_MAX_BYTES - len(render({}).encode("utf-8")) - 4096  # the note's numbers may grow
    urls = embed_thumbs(thumbs, thumbs_dir, budget=budget)
    return render(urls), len(urls)


def _test_rows(cfg: DictConfig, m, classes: list[str]) -> tuple[Path | None, pd.DataFrame | None, np.ndarray]:
    """The flagged test rows for the page's test tab, with the baseline's probabilities: (issues file,
    all its rows, probabilities of its flagged rows); (None, None, empty) when the test rows were not flagged."""
    path = flag_test_issues(cfg, m)
    if not path.is_file():
        if cfg.review.get("test_issues"):
            raise CleanloopError(f"review.test_issues={path}: not found; run `cleanloop flag flag.split=test` first")
        return None, None, np.zeros((0, len(classes)))
    issues = read_csv_strings(path, "test label issues", "run `cleanloop flag flag.split=test`")
    test = set(m.split("test")["image_uuid"])
    unknown = sorted(set(issues.get("image_uuid", [])) - test)
    if unknown:
        raise CleanloopError(f"{path}: {len(unknown)} image_uuid(s) are not test rows of {m.source} (first: "
                             f"{unknown[:3]}); it was flagged on another manifest: re-run `cleanloop flag flag.split=test`")
    probs_path = path.with_name("test_pred_probs.parquet")
    try:
        frame = pd.read_parquet(probs_path)
        frame = frame.assign(image_uuid=frame["image_uuid"].astype(str)).set_index("image_uuid")
        probs = frame[classes]
    except Exception as e:
        raise CleanloopError(f"{probs_path}: cannot read the baseline's test probabilities beside {path.name} "
                             f"({type(e).__name__}); re-run `cleanloop flag flag.split=test`") from e
    return path, issues, probs


def run(cfg: DictConfig) -> Path:
    t0 = time.time()
    rc = cfg.review
    m = load_input(cfg)
    train, classes = m.train.reset_index(drop=True), m.classes
    issues_path = Path(rc.issues) if rc.get("issues") else issues_output(cfg, m)
    issues = read_csv_strings(issues_path, "label issues", "run `cleanloop flag` first or set review.issues=PATH")
    row_of = {u: i for i, u in enumerate(train["image_uuid"])}
    unknown = sorted(set(issues.get("image_uuid", [])) - set(row_of))
    if unknown:
        raise CleanloopError(f"{issues_path}: {len(unknown)} image_uuid(s) are not train rows of {m.source} "
                             f"(first: {unknown[:3]}); it was flagged on another manifest: re-run `cleanloop flag`")
    flagged = flagged_rows(issues, max_rows=int(rc.max_rows), source=str(issues_path))
    n_flagged = len(flagged_rows(issues, source=str(issues_path))) if rc.max_rows else len(flagged)
    oof_path = oof_input(cfg, m)
    oof = load_oof(oof_path, train=train, classes=classes, head=cfg.recipe.head)
    sigmoid = oof.meta.get("head") == "sigmoid"
    probs = normalise_rows(oof.pred_probs) if sigmoid else oof.pred_probs  # what flag ranked by
    at = np.array([row_of[u] for u in flagged["image_uuid"]], dtype=int)
    test_path, test_issues, test_probs = _test_rows(cfg, m, classes)
    test_flagged = flagged_rows(test_issues, source=str(test_path)) if test_issues is not None else None
    test_uuids = list(test_flagged["image_uuid"]) if test_flagged is not None else []
    test_paths = m.split("test").set_index("image_uuid")["abs_path"]

    review_dir = out_path(cfg, "review")
    dec_path = _decisions_file(cfg, review_dir)
    initial, n_decisions = {}, 0
    if dec_path is not None:
        raw = read_csv_strings(dec_path, "decisions file", "export it from the review page (Export decisions.csv)")
        known = set(issues["image_uuid"]) | (set(test_issues["image_uuid"]) if test_issues is not None else set())
        read_decisions(raw, classes=classes, known_uuids=known, source=str(dec_path))
        notes = raw["reviewer_note"] if "reviewer_note" in raw.columns else [""] * len(raw)
        initial = {u.strip(): (d.strip(), n) for u, d, n in zip(raw["image_uuid"], raw["decision"], notes, strict=True)}
        n_decisions = len(initial)

    sources = train["abs_path"].to_numpy()[at].tolist() if len(at) else []
    sources += [str(test_paths[u]) for u in test_uuids]  # the test tab's rows after the train rows
    size = int(rc.thumb_size)
    thumbs = write_thumbs(sources, flagged["image_uuid"].tolist() + test_uuids, review_dir / "thumbs", size=size,
                          workers=int(rc.workers))
    unreadable = sum(name is None for name, _, _ in thumbs)
    links = [Path(s).resolve().as_uri() for s in sources]

    flag_run = _flag_run_id(issues_path)
    details = {"rows": f"{len(flagged)} flagged of {len(issues)} scored train rows"
                       + (f" (the {len(flagged)} lowest label quality of {n_flagged}; review.max_rows)"
                          if len(flagged) < n_flagged else ""),
               "issues": str(issues_path), "probabilities": str(oof_path) + (" (rows normalised)" if sigmoid else ""),
               "flag run": flag_run or "none found beside the issues file (the page is logged to the review run)",
               "then": "Export decisions.csv, then `cleanloop prune prune.decisions=decisions.csv` "
                       "(and `cleanloop review review.decisions=decisions.csv` to log it with this page)"}
    if test_flagged is not None:
        details["test rows"] = (f"{len(test_flagged)} flagged of {len(test_issues)} test rows scored by the baseline "
                                f"model(s) ({test_path}); their decisions correct the test split, never the training "
                                "set: `cleanloop compare compare.test_decisions=decisions.csv` reports both splits")
    # Stable across re-renders of this output folder and manifest, so saved decisions survive a new page.
    key = "cleanloop-review:" + hashlib.sha1(f"{review_dir.resolve()}|{file_hash(m.source)}".encode()).hexdigest()[:16]
    n_train = len(flagged)
    rows = page_rows(flagged, probs[at] if len(at) else np.zeros((0, len(classes))), classes=classes,
                     thumbs=thumbs[:n_train], sources=links[:n_train])
    if test_flagged is not None:
        rows += page_rows(test_flagged, test_probs.loc[test_uuids].to_numpy() if test_uuids else
                          np.zeros((0, len(classes))), classes=classes, thumbs=thumbs[n_train:],
                          sources=links[n_train:], split="test")
    common = {"classes": classes, "title": str(cfg.data.name), "storage_key": key, "initial": initial,
              "thumb_size": size}
    page = page_html(rows, details=details, **common)
    index = review_dir / "index.html"
    write_atomic(index, lambda p: p.write_text(page, encoding="utf-8"))
    logged_page, n_embedded = _logged_page(rows, thumbs, review_dir / "thumbs", index, details, common)
    if dec_path is not None and dec_path.resolve() != (review_dir / "decisions.csv").resolve():
        write_atomic(review_dir / "decisions.csv", lambda p: shutil.copyfile(dec_path, p))

    shot = review_dir / "screenshot.png"
    if rc.screenshot:
        why = take_screenshot(index, shot, chromium=str(rc.chromium), viewport=tuple(rc.viewport))
        if why:
            log.info("review: screenshot skipped: %s", why)
    summary = {"n_rows": len(flagged), "n_flagged": n_flagged, "n_scored": len(issues), "n_unreadable": unreadable,
               "n_decisions": n_decisions, "decisions": str(dec_path) if dec_path else None,
               "n_embedded": n_embedded, "logged_page_bytes": len(logged_page.encode("utf-8")),
               "flag_run_id": flag_run, "issues": str(issues_path), "oof": str(oof_path),
               "n_test_rows": len(test_uuids), "n_test_scored": len(test_issues) if test_issues is not None else 0,
               "test_issues": str(test_path) if test_path else None,
               "page": str(index), "screenshot": str(shot) if shot.is_file() else None}

    tags = {"cleanloop.data": file_hash(m.source), "cleanloop.flag_run": flag_run or "unknown",
            "cleanloop.reviewed": str(dec_path is not None).lower()}
    with step_run(cfg, "review", tags=tags) as run:
        summary["run_id"] = run.info.run_id
        write_json(review_dir / "review_summary.json", summary)
        mlflow.log_metrics({"review/n_rows": len(flagged), "review/n_decisions": n_decisions,
                            "review/n_test_rows": len(test_uuids),
                            "review/n_unreadable": unreadable})
        client = mlflow.MlflowClient()
        logged_to = None
        with tempfile.TemporaryDirectory(prefix="cleanloop-review-") as tmp:
            # review/index.html in MLflow is the self-contained copy (its thumbnails inside it), so
            # review/thumbs/ is not logged; the local page keeps reading its thumbs/ folder.
            copy = Path(tmp) / "index.html"
            copy.write_text(logged_page, encoding="utf-8")
            files = [copy] + [p for p in (review_dir / n for n in ("review_summary.json", "screenshot.png",
                                                                    "decisions.csv")) if p.is_file()]
            if flag_run:
                try:
                    for f in files:
                        client.log_artifact(flag_run, str(f), "review")
                    client.set_tag(flag_run, "cleanloop.review_run", run.info.run_id)
                    logged_to = f"flag run {flag_run}"
                except mlflow.exceptions.MlflowException as e:
                    log.warning("review: cannot log the page to flag run %s (%s); logging it to the review run",
                                flag_run, e.message.splitlines()[0])
            if logged_to is None:  # no flag run in this store: keep the page traceable from the review run
                for f in files:
                    mlflow.log_artifact(str(f), "review")
                logged_to = f"review run {run.info.run_id}"
            else:
                log_artifact_files(files[1:])
    log.info("review: %d flagged rows%s, %s -> %s (logged to %s) in %.1fs", len(flagged),
             f", {n_decisions} decisions from {dec_path}" if dec_path else "",
             f"{unreadable} unreadable image(s)" if unreadable else "thumbnails ready",
             index.resolve().as_uri(), logged_to, time.time() - t0)
    return index
