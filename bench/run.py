"""``make bench``: measure B1-B5 and B9 (B6 on a GPU machine), print them, rewrite bench/RESULTS.md.

B1: 121,514 rows x 25 classes in memory, the size of the team's dataset. B2: ImageNet's
1,281,167 x 1,000 float32, memory-mapped from a temporary .npy (5 GB on disk, deleted after),
which ``find_issues`` streams in chunks. Every figure is the min and median over repeats, each
repeat a fresh process (bench/flagbench.py says why). Cases are interleaved (flag, bare, flag,
bare...) so that load from other work on the machine hits them alike.

B3 (bench/b3.py): the OOF prediction path against the bare model forward, with and without the
image cache. B4 (bench/b4.py): oof=embed against oof=kfold on the demo. B5: `cleanloop cycle`
(what `make cycle` runs) on the demo in a fresh folder. B9 (bench/b9.py): one demo training under
the CPU speed options of model=cnn (channels_last, the multi-tensor AdamW), each off. B6 (bench/gpu.py) runs only where CUDA
is; elsewhere the section shows the last recorded GPU run (bench/results/b6-*.json).
B7 (bench/efficacy.py, ``make bench-efficacy``): cleanloop against a CleanLearning-style peer on
noisy digits; about 15 minutes on 2 cores, so only on request (``--parts b7``), else carried over.

    python bench/run.py                 # everything (about 20 minutes on 2 cores, 5 GB of disk)
    python bench/run.py --parts b1,b4   # only these; the other sections are kept from the last run
    python bench/run.py --parts b7 --b7-args "--quick"   # B7 (make bench-efficacy), args for efficacy.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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
TARGETS = {"b1_wall_s": 2.0, "b1_peak_mib": 1024, "b1_ratio": 3.0, "b2_wall_s": 300.0, "b2_peak_mib": 16 * 1024,
           "b3_ratio": 0.9, "b4_ratio": 0.2}
PARTS = ("b1", "b2", "b3", "b4", "b5", "b9")  # what `make bench` runs by default
OPT_IN = ("b7", "b8")  # run only when named in --parts (b7: make bench-efficacy; b8: the audit bench)


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


def b2(repeats: int, tmp_root: Path, *, shape: tuple[int, int] = B2_SHAPE,
       reference_rows: int = B2_REFERENCE_ROWS) -> dict:
    """B2 at ``shape`` (a smaller one only to try the script: the targets are for B2_SHAPE)."""
    n, k = shape
    disk_bytes = n * k * 4 + 2 * n * 8
    free = shutil.disk_usage(tmp_root).free
    if free < 2 * disk_bytes:
        raise SystemExit(f"B2 needs {disk_bytes / 1e9:.1f} GB on disk; {tmp_root} has {free / 1e9:.1f} GB free "
                         "(pass --tmp-dir, or --skip-b2)")
    out = {}
    with tempfile.TemporaryDirectory(prefix="cleanloop-b2-", dir=tmp_root) as tmp:
        print(f"  writing {n:,} x {k:,} float32 pred_probs to {tmp} ...", flush=True)
        t0 = time.perf_counter()
        write_oof_memmap(tmp, n, k)
        out["generate_s"] = time.perf_counter() - t0
        out["file_gb"] = (Path(tmp) / "pred_probs.npy").stat().st_size / 1e9
        # --batched true is what auto picks at B2_SHAPE; explicit, so that a smaller shape times it too.
        data = ["--data", tmp, "--sample", "--batched", "true"]
        out["flag"] = summary([measure("flag", *data) for _ in range(repeats)])
        out["cleanlab_batched"] = summary([measure("batched-bare", *data[:3])])
    # The in-memory path cannot hold B2 here: measure it at a tenth of the rows, then scale; there,
    # that batched flags the same rows; and what cleanlab's own n_jobs does to its batched finder.
    tenth = ["--n", str(reference_rows), "--k", str(k)]
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


def b6(m: dict) -> dict | None:
    """Run bench/gpu.py on this machine's GPU and record it in bench/results/; None without CUDA."""
    gpu = gpu_available()
    if gpu is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b6.json"
        subprocess.run([sys.executable, str(HERE / "gpu.py"), "--json", str(path)], check=True)
        result = {"date": m["date"], "commit": m["commit"], **json.loads(path.read_text())}
    (HERE / "results").mkdir(exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in gpu.lower()).strip("-")
    (HERE / "results" / f"b6-{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def last_recorded_b6() -> dict | None:
    """The newest recorded GPU run (bench/results/b6-*.json), for a machine without a GPU."""
    files = sorted((f for f in (HERE / "results").glob("b6-*.json") if not f.name.startswith("b6-compile-")),
                   key=lambda f: f.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def recorded_compile_runs() -> list[dict]:
    """``bench/gpu.py --compile-only`` runs recorded in bench/results/b6-compile-*.json."""
    return [json.loads(f.read_text()) for f in sorted((HERE / "results").glob("b6-compile-*.json"))]


def script_json(script: str, *args: str) -> dict:
    """Run bench/<script> in a fresh process; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def b5(repeats: int, m: dict) -> dict:
    """`cleanloop cycle` on the demo in a fresh folder (cold: demo build, MLflow store, every step):
    ``repeats`` runs as configured (trainer.jobs=auto), then one with ``trainer.jobs=1`` (trainings one
    after another) for comparison. Raw figures to bench/results/b5-cycle.json."""
    exe = Path(sys.executable).with_name("cleanloop")
    out = {"when": m["date"], "commit": m["commit"], "machine": {k: m[k] for k in ("cpu", "cores", "ram_gib")},
           "modes": {}}
    for mode, extra, n in (("trainer.jobs=auto", [], repeats), ("trainer.jobs=1", ["trainer.jobs=1"], 1)):
        walls, seconds = [], []
        for _ in range(n):
            with tempfile.TemporaryDirectory(prefix="cleanloop-b5-") as tmp:
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                # a fresh user cache too: no MLflow store template yet, as on a new machine (store_template)
                env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "xdg-cache")}
                proc = subprocess.run([str(exe), "cycle", f"paths.root_dir={tmp}", *extra], cwd=tmp,
                                      capture_output=True, text=True, env=env)
                walls.append(round(time.perf_counter() - t0, 1))
                if proc.returncode != 0:
                    raise RuntimeError(f"cleanloop cycle failed:\n{proc.stderr[-3000:]}")
                summary = json.loads((Path(tmp) / "outputs" / "demo" / "summary.json").read_text())
            seconds.append(summary.get("seconds", {}))
            print(f"  cycle ({mode}) {walls[-1]:.1f} s (load before {load:.2f})", flush=True)
        out["modes"][mode] = {"wall_s": walls, "seconds": seconds, "verdict": summary["verdict"]["text"]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "b5-cycle.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# report


def mm(pair, fmt: str = ".2f", scale: float = 1.0) -> str:
    """'min / median' of a (min, median) pair."""
    return f"{pair[0] * scale:{fmt}} / {pair[1] * scale:{fmt}}"


def ok(value: float, target: float) -> str:
    return "met" if value <= target else "**missed**"


def b1_section(r: dict, m: dict) -> str:
    flag, bare, flag2, bare2 = r["flag_jobs1"], r["bare_jobs1"], r["flag_jobs2"], r["bare_jobs2"]
    ratio = flag["wall_s"][1] / bare["wall_s"][1]
    lines = [
        f"## B1: flag computation, {flag['n']:,} rows x {flag['k']} classes, in memory",
        "",
        f"Measured {m['date']} at commit {m['commit']}.",
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
        f"tables {flag['tables_s'][1]:.2f}, CSVs {flag['csv_s'][1]:.2f} (`io.write_csv`: Arrow's writer for long tables, {flag['csv_mb']:.0f} MB of label_issues.csv); without the CSVs",
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
    scale = flag["n"] / tenth["n"]
    cells = tenth["n"] * tenth["k"]
    per_cell = tenth["peak_mib"][1] * 2**20 / cells
    same = tenth_b.get("issues_digest") == tenth.get("issues_digest")
    lines = [
        f"## B2: ImageNet scale, {flag['n']:,} rows x {flag['k']:,} classes, float32 memmap",
        "",
        f"Measured {m['date']} at commit {m['commit']} (a `--skip-b2` run carries this section over).",
        f"pred_probs written chunk by chunk to a {r['file_gb']:.1f} GB .npy in a temporary folder "
        f"({r['generate_s']:.0f} s, deleted after), labels in memory; the same synthetic noise as B1.",
        "`find_issues` streams pred_probs in row chunks of `cleaning.BATCH_CELLS` cells (`batched=True`, what",
        "auto picks above `cleaning.BATCHED_ABOVE_CELLS`) with the default `filter_by=prune_by_noise_rate`:",
        "cleanlab's filter computed pass by pass (`cleaning._find_issues_batched`; three reads of the memmap),",
        "so it flags what the in-memory path flags. Peak RSS counts the memmap's file pages the kernel keeps",
        "resident (it can drop them); peak heap is `RssAnon`, sampled every 20 ms.",
        "",
        "| case | repeats | wall s (min / median) | peak RSS MiB | peak heap MiB |",
        "|---|---:|---:|---:|---:|",
        f"| flag computation (batched, prune_by_noise_rate) | {flag['repeats']} | {mm(flag['wall_s'], '.1f')} | "
        f"{mm(flag['peak_mib'], '.0f')} | {mm(flag['peak_anon_mib'], '.0f')} |",
        f"| cleanlab `find_label_issues_batched` alone (batch_size 10,000) | {cl['repeats']} | "
        f"{mm(cl['wall_s'], '.1f')} | {mm(cl['peak_mib'], '.0f')} | {mm(cl['peak_anon_mib'], '.0f')} |",
        "",
        "cleanlab's batched finder is shown for scale only: it has just the `low_*` filters, its own count of",
        "issues, and its last step (`_reduce_issues`) copies all of pred_probs into memory (its heap peak).",
        "n_jobs: `find_issues` runs batched in one process. cleanlab's batched pool starts afresh per chunk;",
        f"at {cl1['n']:,} x {cl1['k']:,} its n_jobs=2 took {cl2['wall_s'][1]:.1f} s against {cl1['wall_s'][1]:.1f} s "
        "with n_jobs=1.",
        "",
        f"Where the flag computation's time goes (median s): find_issues {flag['find_issues_s'][1]:.1f} "
        f"({flag['find_issues_s'][1] / (flag['n'] * flag['k'] / 1e6):.3f} s per million cells), "
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
        f"Batched on the same tenth: {tenth_b['wall_s'][1]:.1f} s. Against the injected noise:",
        "",
        "| rows x classes | path | filter | precision | recall | flagged |",
        "|---|---|---|---:|---:|---:|",
        f"| {tenth['n']:,} x {tenth['k']:,} | in memory | prune_by_noise_rate | {tenth['precision']:.3f} | "
        f"{tenth['recall']:.3f} | {tenth['n_issues']:,} |",
        f"| {tenth_b['n']:,} x {tenth_b['k']:,} | batched | prune_by_noise_rate | {tenth_b['precision']:.3f} | "
        f"{tenth_b['recall']:.3f} | {tenth_b['n_issues']:,} |",
        f"| {flag['n']:,} x {flag['k']:,} | batched | prune_by_noise_rate | {flag['precision']:.3f} | "
        f"{flag['recall']:.3f} | {flag['n_issues']:,} |",
        "",
        f"At {tenth['n']:,} x {tenth['k']:,} batched and in memory flag "
        + ("the same rows (equal digests of the two masks)." if same else "**different rows** (the digests of the "
           "two masks differ: a bug, see tests/test_batched_flags.py)."),
        "The switch is automatic so that a big dataset does not run out of memory; it changes time and",
        "memory, not the flags.",
    ]
    return "\n".join(lines)


def b3_section(r: dict, m: dict) -> str:
    bare, dec, cac = r["bare"][1], r["oof_decode"][1], r["oof_cache"][1]
    ld, lc = r["loader_decode"][1], r["loader_cache"][1]
    ratio = cac / bare
    md = r["model"]
    return "\n".join([
        f"## B3: OOF prediction path against the bare model forward ({m['cores']}-core CPU)",
        "",
        f"Measured {m['date']} at commit {m['commit']}.",
        f"bench/b3.py: {r['images']} synthetic 4:3 JPEGs (bench/gpu.py `write_jpegs`, {md['image_size'] * 4 // 3}x"
        f"{md['image_size']}) through the OOF path (manifest rows -> `ManifestDataModule` -> Lightning predict -> "
        "`oof_file.write_oof`) against `Classifier.forward` in inference mode on pre-made uint8 batches of the "
        f"same size ({r['batch']}), {r['threads']} torch threads, DataLoader workers {r['num_workers']}. Model: "
        f"a SigLIP at {md['image_size']} px, {md['num_hidden_layers']} layers, width {md['hidden_size']}. "
        "Images/s, best / median of interleaved repeats (higher is better).",
        "",
        "| case | images/s (best / median) | vs bare forward (median) |",
        "|---|---:|---:|",
        f"| bare model forward | {r['bare'][0]:.1f} / {bare:.1f} | 1.00 |",
        f"| OOF path, decoding every image | {r['oof_decode'][0]:.1f} / {dec:.1f} | {dec / bare:.2f} |",
        f"| OOF path, image cache (`data.cache=true`) | {r['oof_cache'][0]:.1f} / {cac:.1f} | {ratio:.2f} |",
        f"| loader alone, decoding | {r['loader_decode'][0]:.0f} / {ld:.0f} | |",
        f"| loader alone, image cache | {r['loader_cache'][0]:.0f} / {lc:.0f} | |",
        f"| building the cache (once) | {r['cache_build_images_per_s']:.0f} | |",
        "",
        f"The cache reads images {lc / ld:.0f}x faster than decoding them every epoch (loader alone); on the whole",
        f"OOF path here it is worth {cac / dec:.2f}x, because on this CPU the model is most of the cost. The GPU",
        "figures (B6) are where the loader matters: there the model is 50-100x faster and the decode is not.",
        "A ratio above 1 means the OOF path's model calls ran faster than the bench's own loop over the same",
        "batches (both in inference mode on the same threads); I have not found why. Read it as no measurable",
        "overhead, not as a gain.",
        "",
        "| target | measured (median) | |",
        "|---|---:|---|",
        f"| OOF path with the cache >= {TARGETS['b3_ratio']:g} of the bare forward | {ratio:.2f} | "
        f"{'met' if ratio >= TARGETS['b3_ratio'] else '**missed**'} |",
    ])


def b4_section(r: dict, m: dict) -> str:
    k, e = r["kfold"], r["embed"]
    ratio = e["oof_s"][1] / k["oof_s"][1]

    def row(name, x):
        return (f"| {name} | {mm(x['oof_s'], '.1f')} | {x['oof_top1']:.3f} | {x['precision']:.3f} | {x['recall']:.3f} | "
                f"{x['garbage_found']}/{x['n_garbage']} |")
    return "\n".join([
        "## B4: oof=embed against oof=kfold on the demo",
        "",
        f"Measured {m['date']} at commit {m['commit']}.",
        "bench/b4.py: `steps.oof.run` timed in one process after a warm-up (imports, demo, MLflow store), each",
        "repeat with a fresh step cache; then `steps.flag.run` on its output, scored against the demo's ground truth",
        f"(flagged = label issue or outlier). Default configs: model=tiny (random init), 5 folds. {k['repeats']} repeats.",
        "",
        "| oof | OOF step s (min / median) | OOF top-1 vs given labels | flag precision | flag recall | garbage found |",
        "|---|---:|---:|---:|---:|---:|",
        row("kfold (5 fine-tuned folds)", k),
        row("embed (frozen backbone + logistic regression per fold)", e),
        "",
        "| target | measured (median) | |",
        "|---|---:|---|",
        f"| embed <= 1/5 of kfold | {ratio:.2f} | {'met' if ratio <= TARGETS['b4_ratio'] else '**missed**'} |",
        "",
        "embed's flags are weak here because model=tiny is a random-init backbone with no pretrained features;",
        "with MedSigLIP's pretrained tower it is the cheap first pass the README describes (when to use which: README).",
    ])


def b7_section(args: list[str]) -> str:
    """Run bench/efficacy.py in this process (its per-case progress prints live) and render B7."""
    import efficacy

    return efficacy.section(efficacy.main(args))


def b5_section(r: dict, m: dict) -> str:
    rows, steps = [], []
    for mode, x in r["modes"].items():
        walls = x["wall_s"]
        inside = statistics.median(s.get("total", float("nan")) for s in x["seconds"])
        rows.append(f"| {mode} | {len(walls)} | {', '.join(f'{w:.1f}' for w in walls)} | "
                    f"{min(walls):.1f} / {statistics.median(walls):.1f} | {inside:.1f} |")
        last = x["seconds"][-1]
        steps.append(f"- {mode}, last run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in last.items() if k != "total")
                     + ".")
    return "\n".join([
        "## B5: `make cycle` on the demo",
        "",
        f"Measured {m['date']} at commit {m['commit']} (raw: bench/results/b5-cycle.json).",
        "`cleanloop cycle` (what `make cycle` runs once the venv exists) in a fresh temporary folder: builds the demo,",
        "the MLflow store (and its per-version template, in a fresh `XDG_CACHE_HOME`), the audit, the folds, flags,",
        "review page, prune, three seed pairs of trainings and the comparison; nothing cached. `trainer.jobs=auto`",
        "(the CPU default) trains two at a time on this 2-core machine, one thread each; `trainer.jobs=1` trains one",
        "after another with torch's default threads (README \"Trainings side by side\").",
        "",
        "| trainer.jobs | runs | wall s | wall s (min / median) | inside the cycle (its own timer, median) |",
        "|---|---:|---|---:|---:|",
        *rows,
        "",
        "Per step (a training's own time, in its worker where it ran in one; side by side they overlap):",
        *steps,
        "The rest of the wall time is the process start (imports, the MLflow store) and the demo build.",
        "Verdict, last run of each (the thread count changes a training's numbers, README \"Trainings side by side\"):",
        *(f"- {mode}: {x['verdict']}" for mode, x in r["modes"].items()),
    ])


def b8_section() -> str:
    """bench/audit_bench.py in a fresh process (one BLAS thread, as measured); its printed section."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "audit_bench.py")], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"audit_bench.py failed:\n{proc.stderr[-3000:]}")
    section = proc.stdout[proc.stdout.index("## B8:"):]
    # the last line is the result as JSON (also in bench/results/b8-audit.json): not for the page
    return "\n".join(line for line in section.splitlines() if not line.startswith('{"when"')).rstrip()


def b9_section(r: dict, m: dict) -> str:
    rows = r["rows"]
    base = rows["both off"]["median_s"]
    lines = [
        "## B9: one demo training under the CPU speed options (bench/b9.py)",
        "",
        f"Measured {m['date']} at commit {m['commit']}.",
        f"`training.fit_predict` of the demo baseline (model=cnn, {next(iter(rows.values()))['n_train']} train rows, the",
        "recipe's epochs, then the 450 test rows), in fresh processes per variant, variants interleaved; each process",
        f"trains {r['fits']} times and the first fit (warm-up) is not counted: {r['repeats'] * (r['fits'] - 1)} timed fits per variant.",
        "",
        "| variant | s per fit (min / median) | vs both off | test top-1 |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['min_s']:.2f} / {row['median_s']:.2f} | {row['median_s'] / base:.2f}x | "
                     f"{row['test_top1']:.3f} |")
    lines += ["", "Both options change only how the same arithmetic is laid out (NHWC memory, one optimizer call for all",
              "tensors), so test top-1 moves by summation order at most."]
    return "\n".join(lines)


def b6_reading(rows: list[dict]) -> str:
    """What the B6 table says, computed from its rows."""
    def ips(part: str, batch: int | None = None) -> float | None:
        return next((r["images_per_s"] for r in rows if r["part"] == part and "images_per_s" in r
                     and (batch is None or r["batch"] == batch)), None)
    lines = []
    unfused = next((r for r in rows if r["part"] == "train (AdamW not fused)" and "images_per_s" in r), None)
    if unfused and ips("train", unfused["batch"]):
        lines.append(f"- Fused AdamW (cleanloop's default on CUDA): {ips('train', unfused['batch']) / unfused['images_per_s']:.2f}x "
                     f"the unfused train step at batch {unfused['batch']}.")
    comp = next((r for r in rows if r["part"] == "forward (torch.compile)" and "images_per_s" in r), None)
    if comp and ips("forward", comp["batch"]):
        lines.append(f"- `torch.compile` (`model.compile=true`): forward {comp['images_per_s'] / ips('forward', comp['batch']):.2f}x "
                     f"at batch {comp['batch']} ({comp.get('note', '')}); off by default, it pays off on long runs.")
    for tag, what in (("", "decoding JPEGs"), (", image cache", "with the image cache")):
        pred = next((r for r in rows if r["part"] == f"predict (training.predict{tag})" and "images_per_s" in r), None)
        if pred and ips("forward", pred["batch"]):
            lines.append(f"- Predict path {what}: {pred['images_per_s'] / ips('forward', pred['batch']):.2f} of the bare "
                         f"bf16 forward at batch {pred['batch']}.")
    return ("\n\n" + "\n".join(lines)) if lines else ""


def b6_section(r: dict | None, gpu: str | None, *, recorded: bool) -> str:
    head = "## B6: MedSigLIP-shaped model on a GPU (bench/gpu.py)\n\n"
    if r is None:
        return head + (f"GPU {gpu} available but B6 was skipped (--skip-b6)." if gpu
                       else "Not run: no GPU on this machine and none recorded. On a CUDA machine run `python bench/gpu.py` "
                            "(under 5 minutes); `python bench/gpu.py --smoke` is its CPU check (tests/test_bench.py).")
    from gpu import table

    where = (f"Recorded on another machine (no GPU here): {r.get('machine', r['device'])}, {r.get('date', '?')}, commit "
             f"{r.get('commit', '?')}; {r.get('versions', '')}.\n" if recorded else "")
    return head + where + f"{r['device']}, {r['gflops_per_image']:.0f} GFLOP/image forward, peak {r['peak_tflops']:g} " \
                          f"TFLOP/s (MFU is against it), {r['wall_s']:.0f} s.\n\n" + table(r["rows"]) + b6_reading(r["rows"]) \
        + "".join(compile_section(c) for c in recorded_compile_runs())


def compile_section(c: dict) -> str:
    from gpu import table

    eager = {r["part"]: r for r in c["rows"] if "(" not in r["part"] and "images_per_s" in r}
    gains = [f"{r['part'].split(' (')[0]} {r['images_per_s'] / eager[r['part'].split(' (')[0]]['images_per_s']:.2f}x"
             for r in c["rows"] if r["part"].endswith("(torch.compile)") and r["part"].split(" (")[0] in eager
             and "images_per_s" in r]
    return (f"\n\n### torch.compile, eager against compiled in one run (`{c.get('command', 'bench/gpu.py --compile-only')}`)"
            f"\n\n{c.get('machine', c['device'])}, {c.get('date', '?')}, commit {c.get('commit', '?')}.\n\n"
            + table(c["rows"]) + f"\n\nCompiled against eager: {', '.join(gains)}.")


def previous_section(part: str) -> str:
    """Section ``part`` ("b2") of the current RESULTS.md, carried over when this run skips it."""
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    start = text.find(f"## {part.upper()}:")
    if start < 0:
        return f"## {part.upper()}: not measured (run `python bench/run.py --parts {part}`)"
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None].rstrip()


def render(m: dict, sections: dict[str, str]) -> str:
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
        "Sections measured in an earlier run (`--parts`) say their own date and commit.",
        "",
        "\n\n".join(sections[p] for p in sorted(sections)),
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS + OPT_IN)} (default {','.join(PARTS)})")
    p.add_argument("--skip-b2", action="store_true", help="same as leaving b2 out of --parts")
    p.add_argument("--skip-b6", action="store_true", help="do not run bench/gpu.py even on a GPU machine")
    p.add_argument("--repeats", type=int, default=5, help="B1 repeats per case")
    p.add_argument("--b2-repeats", type=int, default=2)
    p.add_argument("--b3-repeats", type=int, default=3)
    p.add_argument("--b4-repeats", type=int, default=2)
    p.add_argument("--b5-repeats", type=int, default=1)
    p.add_argument("--b9-repeats", type=int, default=2)
    p.add_argument("--tmp-dir", type=Path, default=Path(tempfile.gettempdir()), help="where B2 writes its 5 GB")
    p.add_argument("--b7-args", default="", help='arguments for bench/efficacy.py, e.g. "--quick" or '
                                                 '"--cleanloop \'recipe.epochs=10\'"')
    a = p.parse_args(argv)
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS + OPT_IN))
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS + OPT_IN)}")
    if a.skip_b2 and "b2" in parts:
        parts.remove("b2")

    m = machine()
    print(f"bench on {m['cpu']} ({m['cores']} cores, {m['ram_gib']:.1f} GiB), commit {m['commit']}", flush=True)
    sections = {p: previous_section(p) for p in PARTS + OPT_IN}
    if "b1" in parts:
        print(f"B1: {B1_SHAPE[0]:,} x {B1_SHAPE[1]}, {a.repeats} repeats", flush=True)
        sections["b1"] = b1_section(b1(a.repeats), m)
    if "b2" in parts:
        print(f"B2: {B2_SHAPE[0]:,} x {B2_SHAPE[1]:,}", flush=True)
        sections["b2"] = b2_section(b2(a.b2_repeats, a.tmp_dir), m)
    if "b3" in parts:
        print(f"B3: OOF path vs bare forward, {a.b3_repeats} repeats", flush=True)
        sections["b3"] = b3_section(script_json("b3.py", "--repeats", str(a.b3_repeats)), m)
    if "b4" in parts:
        print(f"B4: oof=embed vs oof=kfold on the demo, {a.b4_repeats} repeats", flush=True)
        sections["b4"] = b4_section(script_json("b4.py", "--repeats", str(a.b4_repeats)), m)
    if "b5" in parts:
        print(f"B5: cleanloop cycle on the demo, {a.b5_repeats} run(s) + one with trainer.jobs=1", flush=True)
        sections["b5"] = b5_section(b5(a.b5_repeats, m), m)
    if "b9" in parts:
        print(f"B9: one demo training under the CPU speed options, {a.b9_repeats} repeats", flush=True)
        sections["b9"] = b9_section(script_json("b9.py", "--repeats", str(a.b9_repeats)), m)
    if "b8" in parts:
        print("B8: the leakage audit (bench/audit_bench.py)", flush=True)
        sections["b8"] = b8_section()
    if "b7" in parts:
        print("B7: efficacy, cleanloop against a CleanLearning-style peer (bench/efficacy.py)", flush=True)
        sections["b7"] = b7_section(shlex.split(a.b7_args))
    gpu = gpu_available()
    b6_r = None if (a.skip_b6 or gpu is None) else b6(m)
    recorded = b6_r is None and gpu is None
    sections["b6"] = b6_section(last_recorded_b6() if recorded else b6_r, gpu, recorded=recorded)
    m["load_end"] = os.getloadavg()
    text = render(m, sections)
    RESULTS.write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
