"""``make bench``: measure B1 and B2 (the flag step's computation), print them, rewrite bench/RESULTS.md.

B1: 121,514 rows x 25 classes in memory, the size of the team's dataset. B2: ImageNet's
1,281,167 x 1,000 float32, memory-mapped from a temporary .npy (5 GB on disk, deleted after),
which ``find_issues`` streams in chunks. Every figure is the min and median over repeats, each
repeat a fresh process (bench/flagbench.py says why). Cases are interleaved (flag, bare, flag,
bare...) so that load from other work on the machine hits them alike.

    python bench/run.py                 # B1 and B2 (5-10 minutes on 2 cores, 5 GB of disk)
    python bench/run.py --skip-b2       # B1 only; keeps the B2 section of the last full run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from synth import write_oof_memmap  # bench/ is on sys.path when this runs as a script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
FLAGBENCH = HERE / "flagbench.py"

B1_SHAPE = (121_514, 25)
B2_SHAPE = (1_281_167, 1_000)
B2_REFERENCE_ROWS = 128_117  # the in-memory path at a tenth of B2's rows, for its bytes per cell
B2_DISK_BYTES = B2_SHAPE[0] * B2_SHAPE[1] * 4 + 2 * B2_SHAPE[0] * 8
TARGETS = {"b1_wall_s": 2.0, "b1_peak_mib": 1024, "b1_ratio": 3.0, "b2_wall_s": 300.0, "b2_peak_mib": 16 * 1024}

B2_START = "## B2"  # the section --skip-b2 carries over from the previous RESULTS.md


# ---------------------------------------------------------------------------------------------
# machine


def machine() -> dict:
    """CPU model, cores, RAM (from /proc), load, date, commit and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        mem_kib = 0
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    import cleanlab
    import numpy
    import pandas

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": mem_kib / 2**20,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "python": platform.python_version(), "numpy": numpy.__version__, "pandas": pandas.__version__,
            "cleanlab": cleanlab.__version__, "load_start": os.getloadavg()}


# ---------------------------------------------------------------------------------------------
# measurements


def measure(case: str, *args: str) -> dict:
    """One fresh-process measurement (bench/flagbench.py); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(FLAGBENCH), case, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"flagbench {case} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {case:13s} {' '.join(args):60s} {result['wall_s']:7.2f} s {result['peak_mib']:8.0f} MiB", flush=True)
    return result


def summary(runs: list[dict]) -> dict:
    """min / median of each figure over repeats, plus the fields every repeat shares."""
    out = dict(runs[0])
    for key in ("wall_s", "peak_mib", "peak_anon_mib", "find_issues_s", "tables_s", "csv_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = (min(values), statistics.median(values))
    out["repeats"] = len(runs)
    return out


def b1(repeats: int) -> dict:
    n, k = B1_SHAPE
    shape = ["--n", str(n), "--k", str(k)]
    cases = {(c, j): [] for c in ("flag", "bare") for j in (1, 2)}
    for _ in range(repeats):
        for (case, jobs), runs in cases.items():
            runs.append(measure(case, *shape, "--n-jobs", str(jobs)))
    return {f"{case}_jobs{jobs}": summary(runs) for (case, jobs), runs in cases.items()}


def b2(repeats: int, tmp_root: Path) -> dict:
    n, k = B2_SHAPE
    free = shutil.disk_usage(tmp_root).free
    if free < 2 * B2_DISK_BYTES:
        raise SystemExit(f"B2 needs {B2_DISK_BYTES / 1e9:.1f} GB on disk; {tmp_root} has {free / 1e9:.1f} GB free "
                         "(pass --tmp-dir, or --skip-b2)")
    out = {}
    with tempfile.TemporaryDirectory(prefix="cleanloop-b2-", dir=tmp_root) as tmp:
        print(f"  writing {n:,} x {k:,} float32 pred_probs to {tmp} ...", flush=True)
        t0 = time.perf_counter()
        write_oof_memmap(tmp, n, k)
        out["generate_s"] = time.perf_counter() - t0
        out["file_gb"] = (Path(tmp) / "pred_probs.npy").stat().st_size / 1e9
        data = ["--data", tmp, "--sample"]
        out["flag"] = summary([measure("flag", *data) for _ in range(repeats)])
        out["cleanlab_batched"] = summary([measure("batched-bare", *data)])
    # The in-memory path cannot hold B2 here: measure it at a tenth of the rows, then scale; and
    # there, what cleanlab's own n_jobs does to its batched finder.
    tenth = ["--n", str(B2_REFERENCE_ROWS), "--k", str(k)]
    out["tenth_in_memory"] = summary([measure("find-issues", *tenth, "--batched", "false", "--sample")])
    out["tenth_batched"] = summary([measure("find-issues", *tenth, "--batched", "true")])
    out["tenth_cleanlab_jobs1"] = summary([measure("batched-bare", *tenth)])
    out["tenth_cleanlab_jobs2"] = summary([measure("batched-bare", *tenth, "--n-jobs", "2")])
    return out


def gpu_available() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def b6() -> dict | None:
    if gpu_available() is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b6.json"
        subprocess.run([sys.executable, str(HERE / "gpu.py"), "--json", str(path)], check=True)
        return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# report


def mm(pair, fmt: str = ".2f", scale: float = 1.0) -> str:
    """'min / median' of a (min, median) pair."""
    return f"{pair[0] * scale:{fmt}} / {pair[1] * scale:{fmt}}"


def ok(value: float, target: float) -> str:
    return "met" if value <= target else "**missed**"


def b1_section(r: dict) -> str:
    flag, bare, flag2, bare2 = r["flag_jobs1"], r["bare_jobs1"], r["flag_jobs2"], r["bare_jobs2"]
    ratio = flag["wall_s"][1] / bare["wall_s"][1]
    lines = [
        f"## B1: flag computation, {flag['n']:,} rows x {flag['k']} classes, in memory",
        "",
        "`find_issues` (cleanlab `find_label_issues` + `get_label_quality_scores`, default options) +",
        "`flagcore.flag_tables` (table, per-class issue rates, given->predicted confusions) + the three",
        "CSVs with `io.write_csv`, as `steps/flag.py` runs them; no montage, no outliers. Synthetic float32",
        "pred_probs (bench/synth.py): softmax of noisy logits favouring the true class, 7% flipped labels,",
        "most of them in a fifth of the classes and towards a look-alike class.",
        f"Min / median over {flag['repeats']} repeats, each a fresh process.",
        "",
        "| case | n_jobs | wall s | peak MiB |",
        "|---|---:|---:|---:|",
        f"| flag computation | 1 | {mm(flag['wall_s'])} | {mm(flag['peak_mib'], '.0f')} |",
        f"| bare cleanlab calls | 1 | {mm(bare['wall_s'])} | {mm(bare['peak_mib'], '.0f')} |",
        f"| flag computation | 2 | {mm(flag2['wall_s'])} | {mm(flag2['peak_mib'], '.0f')} |",
        f"| bare cleanlab calls | 2 | {mm(bare2['wall_s'])} | {mm(bare2['peak_mib'], '.0f')} |",
        "",
        f"Where the flag computation's time goes (median s, n_jobs=1): find_issues {flag['find_issues_s'][1]:.2f},",
        f"tables {flag['tables_s'][1]:.2f}, CSVs {flag['csv_s'][1]:.2f} (pandas `to_csv`, {flag['csv_mb']:.0f} MB of label_issues.csv); without the CSVs",
        f"it is {(flag['find_issues_s'][1] + flag['tables_s'][1]) / bare['wall_s'][1]:.1f}x the bare calls.",
        "",
        "| target | measured (median) | |",
        "|---|---:|---|",
        f"| whole computation <= {TARGETS['b1_wall_s']:g} s | {flag['wall_s'][1]:.2f} s | "
        f"{ok(flag['wall_s'][1], TARGETS['b1_wall_s'])} |",
        f"| peak <= 1 GiB | {flag['peak_mib'][1]:.0f} MiB | {ok(flag['peak_mib'][1], TARGETS['b1_peak_mib'])} |",
        f"| <= {TARGETS['b1_ratio']:g}x the bare calls | {ratio:.1f}x | {ok(ratio, TARGETS['b1_ratio'])} |",
        "",
        f"Flags against the injected noise: precision {flag['precision']:.3f}, recall {flag['recall']:.3f} "
        f"({flag['n_issues']:,} flagged).",
        f"n_jobs=2 (cleanlab's per-class pool) changes the flag computation's median by "
        f"{flag2['wall_s'][1] - flag['wall_s'][1]:+.2f} s and the bare calls' by "
        f"{bare2['wall_s'][1] - bare['wall_s'][1]:+.2f} s; its workers' memory is not in the peak (other processes).",
    ]
    return "\n".join(lines)


def b2_section(r: dict, m: dict) -> str:
    flag, cl, tenth, tenth_b = r["flag"], r["cleanlab_batched"], r["tenth_in_memory"], r["tenth_batched"]
    cl1, cl2 = r["tenth_cleanlab_jobs1"], r["tenth_cleanlab_jobs2"]
    scale = B2_SHAPE[0] / B2_REFERENCE_ROWS
    cells = tenth["n"] * tenth["k"]
    per_cell = tenth["peak_mib"][1] * 2**20 / cells
    lines = [
        f"## B2: ImageNet scale, {flag['n']:,} rows x {flag['k']:,} classes, float32 memmap",
        "",
        f"Measured {m['date']} at commit {m['commit']} (a `--skip-b2` run carries this section over).",
        f"pred_probs written chunk by chunk to a {r['file_gb']:.1f} GB .npy in a temporary folder "
        f"({r['generate_s']:.0f} s, deleted after), labels in memory; the same synthetic noise as B1.",
        "`find_issues` sees N x K above `cleaning.BATCHED_ABOVE_CELLS` and streams pred_probs in row",
        "chunks (`batched=None`, auto). Peak RSS counts the memmap's file pages the kernel keeps resident",
        "(it can drop them); peak heap is `RssAnon`, sampled every 20 ms.",
        "",
        "| case | repeats | wall s (min / median) | peak RSS MiB | peak heap MiB |",
        "|---|---:|---:|---:|---:|",
        f"| flag computation (batched) | {flag['repeats']} | {mm(flag['wall_s'], '.1f')} | "
        f"{mm(flag['peak_mib'], '.0f')} | {mm(flag['peak_anon_mib'], '.0f')} |",
        f"| cleanlab `find_label_issues_batched` alone (batch_size 10,000) | {cl['repeats']} | "
        f"{mm(cl['wall_s'], '.1f')} | {mm(cl['peak_mib'], '.0f')} | {mm(cl['peak_anon_mib'], '.0f')} |",
        "",
        "`find_issues` does what `find_label_issues_batched` does (the same flags), through its",
        "`LabelInspector`, but runs cleanlab's last step (`_reduce_issues`) chunk by chunk: cleanlab's",
        "function copies all of pred_probs into memory there, which is its heap peak above.",
        "n_jobs: `find_issues` runs batched in one process. cleanlab's batched pool starts afresh per chunk;",
        f"at {cl1['n']:,} x {cl1['k']:,} its n_jobs=2 took {cl2['wall_s'][1]:.1f} s against {cl1['wall_s'][1]:.1f} s "
        "with n_jobs=1.",
        "",
        f"Where the flag computation's time goes (median s): find_issues {flag['find_issues_s'][1]:.1f}, "
        f"tables {flag['tables_s'][1]:.1f}, CSVs {flag['csv_s'][1]:.1f} ({flag['csv_mb']:.0f} MB of label_issues.csv).",
        "",
        "| target | measured (median, n_jobs=1) | |",
        "|---|---:|---|",
        f"| <= 5 minutes | {flag['wall_s'][1]:.0f} s | {ok(flag['wall_s'][1], TARGETS['b2_wall_s'])} |",
        f"| <= 16 GiB peak | {flag['peak_mib'][1] / 1024:.1f} GiB RSS ({flag['peak_anon_mib'][1] / 1024:.2f} GiB heap) | "
        f"{ok(flag['peak_mib'][1], TARGETS['b2_peak_mib'])} |",
        "",
        "### Why batched above the threshold, and what it changes",
        "",
        "The in-memory path (float64 copy, cleanlab's per-class copy and temporaries) at a tenth of the rows,",
        f"{tenth['n']:,} x {tenth['k']:,}: {tenth['wall_s'][1]:.1f} s and {tenth['peak_mib'][1]:.0f} MiB above its input, "
        f"{per_cell:.0f} bytes per cell;",
        f"at B2 that is about {tenth['peak_mib'][1] * scale / 1024:.0f} GiB and {tenth['wall_s'][1] * scale:.0f} s "
        f"(linear in cells), on a machine with {m['ram_gib']:.0f} GiB.",
        f"Batched on the same tenth: {tenth_b['wall_s'][1]:.1f} s.",
        "",
        "Batched flags come from cleanlab's batched filter, which has only `low_self_confidence` and",
        "`low_normalized_margin`; any other `filter_by` (the default `prune_by_noise_rate`) is replaced",
        "by `cleaning.BATCHED_FALLBACK` with a warning. Against the injected noise:",
        "",
        "| rows x classes | path | filter | precision | recall | flagged |",
        "|---|---|---|---:|---:|---:|",
        f"| {tenth['n']:,} x {tenth['k']:,} | in memory | prune_by_noise_rate | {tenth['precision']:.3f} | "
        f"{tenth['recall']:.3f} | {tenth['n_issues']:,} |",
        f"| {tenth_b['n']:,} x {tenth_b['k']:,} | batched | low_normalized_margin | {tenth_b['precision']:.3f} | "
        f"{tenth_b['recall']:.3f} | {tenth_b['n_issues']:,} |",
        f"| {flag['n']:,} x {flag['k']:,} | batched | low_normalized_margin | {flag['precision']:.3f} | "
        f"{flag['recall']:.3f} | {flag['n_issues']:,} |",
        "",
        f"At {tenth['n']:,} x {tenth['k']:,} batched flags {tenth_b['n_issues']:,} rows against {tenth['n_issues']:,} "
        f"in memory (cleanlab's batched count of issues), precision {tenth_b['precision'] - tenth['precision']:+.3f}, "
        f"recall {tenth_b['recall'] - tenth['recall']:+.3f}.",
        "The switch is automatic so that a big dataset does not run out of memory; `batched=False` keeps",
        "the in-memory filter where the memory exists, and `filter_by=low_normalized_margin` gives the",
        "same filter at every size.",
    ]
    return "\n".join(lines)


def b6_section(r: dict | None, gpu: str | None) -> str:
    head = "## B6: MedSigLIP-shaped model on a GPU (bench/gpu.py)\n\n"
    if r is None:
        return head + (f"GPU {gpu} available but B6 was skipped (--skip-b6)." if gpu
                       else "Not run: no GPU on this machine. On a CUDA machine run `python bench/gpu.py` "
                            "(under 5 minutes); `python bench/gpu.py --smoke` is its CPU check (tests/test_bench.py).")
    from gpu import table

    return head + f"{r['device']}, {r['gflops_per_image']:.0f} GFLOP/image forward, peak {r['peak_tflops']:g} " \
                  f"TFLOP/s, {r['wall_s']:.0f} s.\n\n" + table(r["rows"])


def previous_b2() -> str | None:
    """The B2 section of the current RESULTS.md, if it has measured figures."""
    if not RESULTS.is_file():
        return None
    text = RESULTS.read_text()
    start = text.find(B2_START)
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else None].rstrip()
    return section if "| flag computation (batched)" in section else None


def render(m: dict, b1_r: dict, b2_text: str, b6_text: str) -> str:
    load = f"{m['load_start'][0]:.1f} at the start, {m['load_end'][0]:.1f} at the end"
    shared = (" The cores were shared with other work (load above 1 per core), so wall times are"
              " pessimistic and noisy; medians over fresh processes damp it." if max(m["load_start"][0], m["load_end"][0]) > 1.0
              else "")
    return "\n".join([
        "# Benchmarks",
        "",
        "Written by `make bench` (bench/run.py); rerun it rather than editing this file.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM",
        f"- Date: {m['date']}; commit {m['commit']}",
        f"- Python {m['python']}, numpy {m['numpy']}, pandas {m['pandas']}, cleanlab {m['cleanlab']}",
        f"- 1-minute load average: {load}.{shared}",
        "- Peak memory: resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just",
        "  before the call) minus the resident set at that moment, in a fresh process per repeat.",
        "",
        b1_section(b1_r),
        "",
        b2_text,
        "",
        "## B3: not yet measured",
        "",
        "## B4: not yet measured",
        "",
        "## B5: not yet measured",
        "",
        b6_text,
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-b2", action="store_true", help="B1 only (B2 takes minutes and 5 GB of disk)")
    p.add_argument("--skip-b6", action="store_true", help="do not run bench/gpu.py even on a GPU machine")
    p.add_argument("--repeats", type=int, default=5, help="B1 repeats per case")
    p.add_argument("--b2-repeats", type=int, default=2)
    p.add_argument("--tmp-dir", type=Path, default=Path(tempfile.gettempdir()), help="where B2 writes its 5 GB")
    a = p.parse_args(argv)

    m = machine()
    print(f"bench on {m['cpu']} ({m['cores']} cores, {m['ram_gib']:.1f} GiB), commit {m['commit']}", flush=True)
    print(f"B1: {B1_SHAPE[0]:,} x {B1_SHAPE[1]}, {a.repeats} repeats", flush=True)
    b1_r = b1(a.repeats)
    if a.skip_b2:
        b2_text = previous_b2() or "## B2: not measured (run `python bench/run.py` without --skip-b2)"
    else:
        print(f"B2: {B2_SHAPE[0]:,} x {B2_SHAPE[1]:,}", flush=True)
        b2_text = b2_section(b2(a.b2_repeats, a.tmp_dir), m)
    gpu = gpu_available()
    b6_r = None if a.skip_b6 else b6()
    m["load_end"] = os.getloadavg()
    text = render(m, b1_r, b2_text, b6_section(b6_r, gpu))
    RESULTS.write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
