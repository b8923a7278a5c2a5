"""B1 / B2: the ``flag`` step's computation on synthetic out-of-fold probabilities.

One measurement = one fresh process (``python bench/flagbench.py CASE ...``) that builds or
loads its inputs, warms up on a tiny input, then times one call and records its peak memory.
A fresh process per repeat keeps the memory figure honest: allocator pages freed by an earlier
repeat would otherwise hide the next one's peak.

Peak memory is the resident-set high-water mark (``VmHWM`` in /proc/self/status, reset just
before the call by writing 5 to /proc/self/clear_refs) minus the resident set just before the
call. It counts every touched page, including file pages of a memmap that the kernel could drop.
With ``--sample`` a thread also samples ``RssAnon`` (heap only) every 20 ms.

CASE is ``flag`` (find_issues + flag_tables + the three CSVs, as in steps/flag.py, without the
montage and outliers) or ``bare`` (cleanlab's find_label_issues + get_label_quality_scores
only, on the same arrays), ``batched-bare`` (cleanlab's find_label_issues_batched alone) or
``find-issues`` (cleanloop.cleaning.find_issues alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth import make_oof  # noqa: E402

MIB = 2**20


def _status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


class PeakMemory:
    """Peak resident memory of a block, in MiB, above the resident set at its start."""

    def __init__(self, sample: bool = False):
        self.sample = sample
        self.method = "VmHWM after clear_refs"
        self.peak_mib = self.peak_anon_mib = float("nan")

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:  # no /proc: ru_maxrss is a lifetime high-water mark, so this only bounds it
            self.method = "ru_maxrss (lifetime high-water mark)"
        s = _status_kib("VmRSS", "RssAnon") if Path("/proc/self/status").exists() else {}
        self.start_kib = s.get("VmRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        self.anon_start_kib = self.anon_max_kib = s.get("RssAnon", 0)
        self._stop = threading.Event()
        if self.sample:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.02):
            self.anon_max_kib = max(self.anon_max_kib, _status_kib("RssAnon")["RssAnon"])

    def __exit__(self, *exc):
        self._stop.set()
        if self.sample:
            self._thread.join()
        if self.method.startswith("VmHWM"):
            hwm = _status_kib("VmHWM")["VmHWM"]
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mib = (hwm - self.start_kib) / 1024
        if self.sample:
            self.peak_anon_mib = (self.anon_max_kib - self.anon_start_kib) / 1024
        return False


def names(n: int, k: int, labels: np.ndarray):
    """Class names, and image_uuid / path / given label columns as the manifest's train frame holds them."""
    import pandas as pd

    classes = [f"n{i:08d}" for i in range(k)] if k > 100 else [f"class_{i:02d}" for i in range(k)]
    uuids = [f"{i:012x}" for i in range(n)]
    given = np.asarray(classes, dtype=object)[labels]
    paths = [f"/data/images/{c}/{u}.jpg" for c, u in zip(given, uuids, strict=True)]
    train = pd.DataFrame({"image_uuid": uuids, "abs_path": paths, "label": given})  # str columns, as read
    return classes, train["image_uuid"], train["abs_path"], train["label"]


def flag_computation(labels, pred_probs, *, classes, uuids, paths, given, out_dir, n_jobs: int = 1,
                     batched: bool | None = None) -> dict:
    """What ``cleanloop flag`` computes and writes, without outliers and montage; phase timings in s."""
    from cleanloop.cleaning import find_issues
    from cleanloop.flagcore import flag_tables
    from cleanloop.io import write_csv

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab's own (e.g. a class below min_examples_per_class)
        found = find_issues(labels, pred_probs, n_jobs=n_jobs, batched=batched)
    t1 = time.perf_counter()
    tables = flag_tables(found, classes=classes, image_uuids=uuids, paths=paths, given_labels=given)
    t2 = time.perf_counter()
    out_dir = Path(out_dir)
    write_csv(out_dir / "label_issues.csv", tables.issues)
    write_csv(out_dir / "issues_per_class.csv", tables.per_class)
    write_csv(out_dir / "issue_confusions.csv", tables.confusions)
    t3 = time.perf_counter()
    return {"find_issues_s": t1 - t0, "tables_s": t2 - t1, "csv_s": t3 - t2,
            "csv_mb": (out_dir / "label_issues.csv").stat().st_size / 1e6,
            "n_issues": int(found["is_label_issue"].sum()), "is_issue": found["is_label_issue"].to_numpy()}


def bare_calls(labels, pred_probs, *, n_jobs: int = 1) -> dict:
    """cleanlab's own two calls, nothing else."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    is_issue = find_label_issues(labels, pred_probs, n_jobs=n_jobs)
    get_label_quality_scores(labels, pred_probs)
    return {"n_issues": int(is_issue.sum()), "is_issue": is_issue}


def batched_bare(labels, pred_probs, *, n_jobs: int = 1, batch_size: int = 10_000) -> dict:
    """cleanlab's find_label_issues_batched alone, with its default batch size."""
    from cleanlab.experimental.label_issues_batched import find_label_issues_batched

    is_issue = find_label_issues_batched(labels, pred_probs, batch_size=batch_size, n_jobs=n_jobs,
                                         verbose=False, return_mask=True)
    return {"n_issues": int(is_issue.sum()), "is_issue": is_issue}


def find_issues_only(labels, pred_probs, *, n_jobs: int = 1, batched: bool | None = None) -> dict:
    """cleanloop.cleaning.find_issues alone (its memory is what the batched threshold is about)."""
    from cleanloop.cleaning import find_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = find_issues(labels, pred_probs, n_jobs=n_jobs, batched=batched)
    return {"n_issues": int(found["is_label_issue"].sum()), "is_issue": found["is_label_issue"].to_numpy()}


def _warm_up() -> None:
    """Import and run every code path once on a tiny input, so lazy imports are not timed."""
    labels, probs, _ = make_oof(2_000, 25, seed=1)
    classes, uuids, paths, given = names(2_000, 25, labels)
    with tempfile.TemporaryDirectory() as tmp:
        flag_computation(labels, probs, classes=classes, uuids=uuids, paths=paths, given=given, out_dir=tmp)
        flag_computation(labels, probs, classes=classes, uuids=uuids, paths=paths, given=given, out_dir=tmp,
                         batched=True)
    bare_calls(labels, probs)


def measure(case: str, *, n: int, k: int, n_jobs: int = 1, data: str | None = None, batched: bool | None = None,
            sample: bool = False, seed: int = 0) -> dict:
    """One timed, memory-measured call of ``case`` in this process."""
    if data:  # B2: pred_probs memory-mapped from disk, labels in memory
        pred_probs = np.load(Path(data) / "pred_probs.npy", mmap_mode="r")
        labels, true = np.load(Path(data) / "labels.npy"), np.load(Path(data) / "true.npy")
        n, k = pred_probs.shape
    else:
        labels, pred_probs, true = make_oof(n, k, seed=seed)
    classes, uuids, paths, given = names(n, k, labels)
    _warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        with PeakMemory(sample=sample) as mem:
            t0 = time.perf_counter()
            if case == "flag":
                out = flag_computation(labels, pred_probs, classes=classes, uuids=uuids, paths=paths, given=given,
                                       out_dir=tmp, n_jobs=n_jobs, batched=batched)
            elif case == "bare":
                out = bare_calls(labels, pred_probs, n_jobs=n_jobs)
            elif case == "batched-bare":
                out = batched_bare(labels, pred_probs, n_jobs=n_jobs)
            elif case == "find-issues":
                out = find_issues_only(labels, pred_probs, n_jobs=n_jobs, batched=batched)
            else:
                raise SystemExit(f"unknown case {case!r}")
            wall = time.perf_counter() - t0
    is_issue, noisy = out.pop("is_issue"), labels != true
    tp = int((is_issue & noisy).sum())
    return {"case": case, "n": n, "k": k, "n_jobs": n_jobs, "wall_s": wall, "peak_mib": mem.peak_mib,
            "peak_anon_mib": mem.peak_anon_mib, "memory_method": mem.method,
            # equal digests = the same rows flagged (B2: batched against in memory)
            "issues_digest": hashlib.sha256(np.packbits(is_issue)).hexdigest()[:16],
            "precision": tp / max(1, int(is_issue.sum())), "recall": tp / max(1, int(noisy.sum())), **out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=["flag", "bare", "batched-bare", "find-issues"])
    p.add_argument("--n", type=int, default=121_514)
    p.add_argument("--k", type=int, default=25)
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument("--data", help="folder with pred_probs.npy / labels.npy / true.npy (memory-mapped)")
    p.add_argument("--batched", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--sample", action="store_true", help="also sample RssAnon every 20 ms")
    a = p.parse_args(argv)
    batched = {"auto": None, "true": True, "false": False}[a.batched]
    result = measure(a.case, n=a.n, k=a.k, n_jobs=a.n_jobs, data=a.data, batched=batched, sample=a.sample)
    print(json.dumps(result))  # last line: what bench/run.py reads


if __name__ == "__main__":
    main()
