"""``cleanloop audit``: exact and near duplicate images within and across splits, before any training.

A cleaned-vs-baseline comparison is only as honest as its test split: a copy of a train image in
test flatters both models, and copies under two patient ids straddle "grouped" folds, where the
OOF probability of a memorised twin hides its label error. This step finds the copies (content
hash; perceptual hash confirmed at pixel level; with ``audit.embeddings``, cosine neighbours of
backbone embeddings) with the pure functions of :mod:`cleanloop.audit` and writes the ``audit/``
files of CONTRACT §3:

- ``duplicates.csv``: one row per linked pair (``image_uuid_a, image_uuid_b, kind, similarity,
  split_a, split_b, label_a, label_b, group_a, group_b, method``);
- ``leakage_per_class.csv``: per class, train<->test and train<->val copies, conflicting-label copies;
- ``conflicting_labels.csv``: train rows in a duplicate cluster whose labels disagree;
- ``fold_groups.csv``: the group each train row's folds keep together once copies are merged
  (``oof`` reads it when ``audit.merge_groups`` is on);
- ``duplicate_pairs.png``: the top cross-split pairs side by side; ``audit_summary.json``.

Its metrics go to an MLflow ``audit`` run (``audit/leaks/train_test`` and the others of
:func:`cleanloop.audit.summary_metrics`).

What it reads. Exact copies come from the files' BLAKE2b digests that the step's cache key has
just computed (:func:`cleanloop.lineage.content_digests`: read again only for files whose stat
changed), not from another pass over the bytes. The perceptual hashes and thumbnails come from the
on-disk image cache when it already holds every image of the manifest at ``model.image_size`` >=
``PIXELS_MIN_SIDE`` (built by ``cleanloop cache`` or ``data.cache=true``; never built for the
audit; ``audit.image_cache=false`` ignores it), else from decoding the files. The cache pads an
image to square; its bars are cut off again (:func:`cleanloop.audit.unpadded`, each image's size
read from its header), so both paths hash and compare the image stretched to a square, and give
the same pairs (README, the audit). The log and ``audit_summary.json`` say which was used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cleanloop.config import file_hash
from cleanloop.errors import CleanloopError
from cleanloop.io import write_csv, write_json
from cleanloop.steps.common import cached, entry_key, find_entry, load_input, out_path
from cleanloop.steps.locate import audit_embedding_files, audit_parts

log = logging.getLogger(__name__)

AUDIT_FILES = ["duplicates.csv", "leakage_per_class.csv", "conflicting_labels.csv", "fold_groups.csv",
               "duplicate_pairs.png", "audit_summary.json"]
MONTAGE_PAIRS = 20  # cross-split pairs drawn in duplicate_pairs.png (two cells each)


# Searches started by prefetch(), by what they search (_search_id): a search is only ever taken
# for the same rows and settings it was started with.
_prefetched: dict = {}  # search id -> the started search (cleanloop.parallel.submit)


def _search_args(cfg: DictConfig) -> dict:
    """The scalar settings of the search (its inputs are :func:`_search_inputs`)."""
    ac = cfg.audit
    args = {"phash_max_distance": int(ac.phash_max_distance), "min_pixel_ncc": float(ac.min_pixel_ncc),
            "workers": int(ac.workers)}
    if ac.get("embeddings"):
        args["min_cosine"] = float(ac.min_cosine)
    return args


def _search_inputs(cfg: DictConfig, rows: pd.DataFrame) -> tuple[dict, dict]:
    """The search's inputs beside the rows: the files' digests, the cached pixels (or None), the
    embeddings (or None); and what they are, in words, for the log and the summary."""
    from cleanloop.lineage import content_digests

    digests, _ = content_digests([str(p) for p in rows["path"]], Path(cfg.paths.cache_dir) / "lineage",
                                 workers=int(cfg.data.get("scan_workers", 4)))
    unread = [str(p) for p, d in zip(rows["path"], digests, strict=True) if d == "missing"]
    if unread:
        raise CleanloopError(f"cannot read {len(unread)} of {len(rows)} image file(s): {', '.join(unread[:5])}"
                             f"{' and more' if len(unread) > 5 else ''}; fix or remove them from the manifest")
    pixels, source = _cached_pixels(cfg, digests)
    sizes = None
    if pixels is not None:  # the squares' bars are cut off again: headers only, no decode
        from cleanloop.audit import image_sizes

        sizes = image_sizes([str(p) for p in rows["path"]], workers=int(cfg.audit.workers))
    files = audit_embedding_files(cfg)
    embeddings = _read_embeddings(files, rows["image_uuid"].tolist(), cfg.audit.embeddings) if files else None
    inputs = {"digests": digests, "pixels": pixels, "sizes": sizes, "embeddings": embeddings}
    about = {"pixels": source, "embeddings": str(cfg.audit.embeddings) if files else None}
    return inputs, about


def _cached_pixels(cfg: DictConfig, digests: list[str]):
    """A reader of the image cache's squares of these files when it holds all of them; else None.
    Also the source in words."""
    from cleanloop import audit
    from cleanloop.imagecache import cache_from_config

    if not cfg.audit.get("image_cache", True):
        return None, "image files (audit.image_cache=false)"
    cache = cache_from_config(cfg)
    if cache.size < audit.PIXELS_MIN_SIDE:
        return None, (f"image files (the image cache's {cache.size} px squares are under "
                      f"{audit.PIXELS_MIN_SIDE} px)")
    reader = cache.lookup(digests)
    if reader is None:
        return None, f"image files (no complete image cache at {cache.dir})"
    return reader, f"image cache ({reader.fmt}, {cache.size} px, {cache.dir})"


def _read_embeddings(files: list[Path], uuids: list[str], given) -> np.ndarray:
    """The embeddings of ``files`` (:func:`cleanloop.steps.locate.audit_embedding_files`) as float32
    rows in the order of ``uuids``, matched by image_uuid; every row must have one."""
    try:
        if len(files) == 2:  # embeddings.npy and embedding_ids.parquet, as oof writes them
            emb = np.load(files[0])
            ids = pd.read_parquet(files[1], columns=["image_uuid"])["image_uuid"]
        else:
            table = pd.read_parquet(files[0])
            if "image_uuid" not in table.columns:
                raise CleanloopError(f"audit.embeddings={given}: no image_uuid column")
            ids, values = table["image_uuid"], table.drop(columns="image_uuid")
            if values.shape[1] == 1 and values.iloc[:, 0].dtype == object:  # one column of vectors
                emb = np.stack([np.asarray(v, dtype=np.float32) for v in values.iloc[:, 0]]) if len(values) \
                    else np.zeros((0, 0), np.float32)
            else:  # one numeric column per dimension
                emb = values.to_numpy(dtype=np.float32)
    except CleanloopError:
        raise
    except Exception as e:  # unreadable or ragged files: one line saying so
        raise CleanloopError(f"audit.embeddings={given}: cannot read embeddings ({type(e).__name__}: {e})") from e
    ids = ids.astype(str).str.strip()
    if emb.ndim != 2 or len(emb) != len(ids):
        raise CleanloopError(f"audit.embeddings={given}: {len(ids)} image_uuids for embeddings of shape {emb.shape}; "
                             "expected one row of floats per image_uuid")
    if ids.duplicated().any():
        raise CleanloopError(f"audit.embeddings={given}: image_uuid {ids[ids.duplicated()].iloc[0]!r} has two rows")
    position = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    missing = [u for u in uuids if u not in position.index]
    if missing:
        raise CleanloopError(f"audit.embeddings={given}: no row for {len(missing)} of the manifest's {len(uuids)} "
                             f"rows ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                             "embed every row of every split")
    return emb[position.loc[uuids].to_numpy()].astype(np.float32)


def _search_id(rows: pd.DataFrame, args: dict, inputs: dict) -> str:
    """What a search searches: the rows, the settings and the inputs (digests, which pixels, embeddings)."""
    digest = hashlib.blake2b(pd.util.hash_pandas_object(rows, index=True).to_numpy().tobytes(), digest_size=16)
    digest.update(json.dumps(args, sort_keys=True).encode())
    digest.update("\n".join(inputs["digests"]).encode())
    pixels = inputs["pixels"]
    if pixels is not None:  # a CacheReader: its store and the entries it reads
        digest.update(json.dumps([pixels.root, pixels.size, pixels.fmt, [str(k) for k in pixels.keys],
                                  [list(map(int, wh)) for wh in inputs["sizes"]]]).encode())
    if inputs["embeddings"] is not None:
        digest.update(np.ascontiguousarray(inputs["embeddings"]).tobytes())
    return digest.hexdigest()


def prefetch(cfg: DictConfig) -> bool:
    """Start this config's duplicate search in a forked process; True if one was started.

    ``cycle`` calls it before it loads torch, Lightning and transformers (seconds of imports): the
    search (mostly the pixel check of the perceptual-hash candidates; bench/RESULTS.md B8 times it on
    the demo with copies injected) runs on another core beside the imports, in a process of its own
    (a thread would share the interpreter lock with the imports), and :func:`run`
    takes its result for the same rows and settings. Nothing is started when the audit is off or its
    cache entry is finished (it will be reused). The fork happens before torch loads, so the child
    shares no thread pool with the parent (cleanloop.parallel).
    """
    from cleanloop import audit, parallel

    if not cfg.audit.get("enabled", True):
        return False
    m = load_input(cfg)
    if bool(cfg.paths.get("reuse_steps", True)) and find_entry(cfg, "audit", audit_parts(cfg, m), m) is not None:
        return False
    rows, args = _rows(m), _search_args(cfg)
    inputs, _ = _search_inputs(cfg, rows)
    _prefetched[_search_id(rows, args, inputs)] = parallel.submit(
        "audit", lambda: audit.find_duplicates(rows, **args, **inputs))
    return True


def drop_prefetched() -> None:
    """Stop the searches :func:`prefetch` started that no step took (a cycle that failed before its audit)."""
    while _prefetched:
        _, child = _prefetched.popitem()
        child.stop()


def run(cfg: DictConfig) -> dict:
    """Audit the input manifest for copies (cached by key); returns the audit summary with ``run_id``."""
    m = load_input(cfg)
    key, lineage = entry_key(cfg, "audit", audit_parts(cfg, m), m)
    info = cached(cfg, "audit", key, lambda out_dir: _audit(cfg, m, out_dir, key),
                  publish_to=out_path(cfg, "audit"), names=AUDIT_FILES, lineage=lineage)
    return {**info, "out_dir": str(out_path(cfg, "audit"))}


def _rows(m) -> pd.DataFrame:
    """The manifest as :func:`cleanloop.audit.find_duplicates` reads it: absolute paths, blank groups as ''."""
    rows = pd.DataFrame({"image_uuid": m.df["image_uuid"].to_numpy(), "path": m.df["abs_path"].to_numpy(),
                         "label": m.df["label"].to_numpy(), "split": m.df["split"].to_numpy()})
    if "group" in m.df.columns:
        rows["group"] = m.df["group"].fillna("").astype(str).str.strip().to_numpy()
    return rows


def _audit(cfg: DictConfig, m, out_dir: Path, key: str) -> dict:
    import mlflow

    from cleanloop import audit
    from cleanloop.cleaning import render_montage
    from cleanloop.tracking import log_artifact_files, log_dataset, manifest_dataset_name, step_run

    t0 = time.time()
    ac = cfg.audit
    rows = _rows(m)
    data_hash = file_hash(m.source)
    args = _search_args(cfg)
    inputs, about = _search_inputs(cfg, rows)  # before the run: a bad embeddings file fails no run
    with step_run(cfg, "audit", tags={"cleanloop.data": data_hash, "cleanloop.audit_key": key}) as run:
        log_dataset(m.df, m.source, name=manifest_dataset_name("input", m.source), context="audit", digest=data_hash)
        log.info("audit: hashes and thumbnails from the %s; exact copies by the BLAKE2b digests of the cache key%s",
                 about["pixels"], f"; embedding neighbours from {about['embeddings']}" if about["embeddings"] else "")
        started = _prefetched.pop(_search_id(rows, args, inputs), None)
        pairs = started.result() if started is not None else audit.find_duplicates(rows, **args, **inputs)
        leakage = audit.leakage_per_class(pairs, rows, classes=m.classes)
        conflicts = audit.conflicting_label_rows(pairs, rows)
        train = rows[rows["split"] == "train"].reset_index(drop=True)
        groups = audit.merge_groups(train, pairs)
        metrics = audit.summary_metrics(pairs, rows)

        write_csv(out_dir / "duplicates.csv", pairs)
        write_csv(out_dir / "leakage_per_class.csv", leakage)
        write_csv(out_dir / "conflicting_labels.csv", conflicts)
        write_csv(out_dir / "fold_groups.csv", pd.DataFrame({"image_uuid": train["image_uuid"],
                                                             "group": np.asarray(groups)}))
        _montage(pairs, rows, out_dir / "duplicate_pairs.png", render_montage)
        summary = {"n_rows": len(rows), "n_pairs": len(pairs), "metrics": metrics, "run_id": run.info.run_id,
                   "phash_max_distance": int(ac.phash_max_distance), "min_pixel_ncc": float(ac.min_pixel_ncc),
                   "pixels_from": about["pixels"], "embeddings": about["embeddings"],
                   "min_cosine": args.get("min_cosine"), "seconds": round(time.time() - t0, 1)}
        write_json(out_dir / "audit_summary.json", summary)
        mlflow.log_metrics(metrics)
        log_artifact_files([out_dir / n for n in AUDIT_FILES])
    leaks = int(metrics.get("audit/leaks/train_test", 0)) + int(metrics.get("audit/leaks/train_val", 0))
    log.info("audit: %d duplicate pair(s) among %d rows (%d exact), %d train<->test/val leak(s), %d conflicting-label "
             "cluster(s) in %.1fs -> %s", len(pairs), len(rows), int(metrics.get("audit/pairs_exact", 0)), leaks,
             int(metrics.get("audit/conflicting_label_clusters", 0)), time.time() - t0, out_path(cfg, "audit"))
    if leaks:
        log.warning("audit: %d train image(s) have a copy in test or val; see audit/duplicates.csv "
                    "(audit.test_leaks=exclude makes compare report the test split without them too)", leaks)
    return {"run_id": run.info.run_id, "n_pairs": len(pairs), **{k.removeprefix("audit/"): v for k, v in metrics.items()}}


def _montage(pairs: pd.DataFrame, rows: pd.DataFrame, path: Path, render_montage) -> None:
    """The most similar cross-split pairs, each as two neighbouring cells (train copy first)."""
    cross = pairs[pairs["split_a"] != pairs["split_b"]].head(MONTAGE_PAIRS)
    where = dict(zip(rows["image_uuid"], rows["path"], strict=True))
    paths, captions = [], []
    for p in cross.itertuples(index=False):
        a_first = p.split_a == "train" or p.split_b != "train"
        for side in ("a", "b") if a_first else ("b", "a"):
            uuid, split, label = (getattr(p, f"{f}_{side}") for f in ("image_uuid", "split", "label"))
            paths.append(where[uuid])
            captions.append(f"{split}: {label}\n{p.kind} {p.similarity:.3f}")
    legend = [f"The {len(cross)} most similar pairs of {int((pairs['split_a'] != pairs['split_b']).sum())} "
              "cross-split pairs (all of them: audit/duplicates.csv), each pair side by side, train first.",
              "Caption: split: given label; exact = same bytes, near = confirmed look-alike, with its similarity."]
    render_montage(paths, captions, path, columns=10, legend=legend, empty="no cross-split copies")
