"""docs/scaling.md: what the team's k-fold OOF and retrains cost on 1, 2 and 8 GPUs and on a SLURM array.

Projects wall time from B6's measured throughput (bench/gpu.py on one GPU; raw results in
bench/results/) and the workload: the training set's size, the recipe (epochs, batch, budget), the
folds and the seed pairs. The defaults come from conf/ (model=medsiglip) and from the team's
dataset; the test and val sizes are assumed. It prints a markdown page; every number on it is
computed here, so the page is regenerated, never edited:

    python bench/scaling.py > docs/scaling.md
    python bench/scaling.py --train-images 50000 --ddp-efficiency 0.95     # another workload
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DEFAULT_JSON = "bench/results/b6-nvidia-h200.json"
DEFAULT_COMPILE_JSON = "bench/results/b6-compile-nvidia-h200.json"
MODEL = "medsiglip"            # the team's model; its recipe and seed count are read from conf/
TEAM_TRAIN_IMAGES = 121_514    # the dermatology set's train rows
FLAGGED_FRACTION = 0.071       # share of train rows the team's flags prune
TEST_FRACTION = 0.10           # assumed: the team's test split size is not known here
GPU_COUNTS = (1, 2, 8)
DDP_EFFICIENCY = 0.9           # assumed, per doubling of GPUs; not measured
TRAIN_PART, PREDICT_PART = "train", "predict (training.predict)"


# ---------------------------------------------------------------------------------------------
# Inputs: the measurements and the workload


@dataclass(frozen=True)
class Workload:
    train_images: int    # N: train rows of the input manifest
    test_images: int     # T: test rows, predicted once after each retrain
    val_images: int      # V: val rows, validated once per epoch in each retrain (the folds have none)
    epochs: int          # E: recipe.epochs
    batch: int           # recipe.batch_size (per device)
    budget: str          # recipe.budget: steps | epochs
    folds: int           # k: oof.n_folds
    repeats: int         # R: oof.repeats
    seeds: int           # P: compare.seeds, seed pairs (baseline + cleaned) after the one OOF
    flagged: float       # f: share of train rows pruned before the cleaned retrain


@dataclass(frozen=True)
class Rates:
    train: float         # images/s of one GPU's train step at the recipe's batch
    predict: float       # images/s of one GPU's predict path (loader + forward)


def conf_defaults(model: str = MODEL, conf: Path = CONF) -> dict:
    """The recipe and loop settings `cleanloop cycle model=<model>` composes, with where each came from."""
    def load(rel: str) -> dict:
        path = conf / rel
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}

    recipe, own = load("recipe/default.yaml"), load(f"recipe_model/{model}.yaml")  # config.yaml's order
    model_cfg, oof = load(f"model/{model}.yaml"), load("oof/kfold.yaml")
    src = {k: (f"conf/recipe_model/{model}.yaml" if k in own else "conf/recipe/default.yaml")
           for k in ("epochs", "batch_size", "budget")}
    return {
        "epochs": int(own.get("epochs", recipe["epochs"])), "epochs_src": src["epochs"],
        "batch": int(own.get("batch_size", recipe["batch_size"])), "batch_src": src["batch_size"],
        "budget": str(own.get("budget", recipe.get("budget", "epochs"))), "budget_src": src["budget"],
        "folds": int(oof["n_folds"]), "repeats": int(oof.get("repeats", 1)),
        # compare.seeds defaults to model.compare_seeds (conf/compare/default.yaml), else 1
        "seeds": int(model_cfg.get("compare_seeds", 1)),
        "seeds_src": f"conf/model/{model}.yaml compare_seeds" if "compare_seeds" in model_cfg
        else "conf/compare/default.yaml",
        "own_recipe": bool(own),
    }


def slurm_timeout_min(conf: Path = CONF) -> int | None:
    path = conf / "hydra" / "launcher" / "slurm.yaml"
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    return int(cfg["timeout_min"]) if cfg and cfg.get("timeout_min") else None


def load_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data.get("rows"), list):
        raise SystemExit(f"{path}: no 'rows' list; expected bench/gpu.py's raw results")
    return data


def rows_of(data: dict, part: str) -> list[dict]:
    return [r for r in data["rows"] if r.get("part") == part and r.get("images_per_s")]


def pick_batch(rows: list[dict], batch: int) -> tuple[dict, str]:
    """The row measured at ``batch``, else the largest batch below it, else the smallest above."""
    if not rows:
        raise SystemExit("the JSON has no such row")
    exact = [r for r in rows if r["batch"] == batch]
    if exact:
        return exact[0], "measured at this batch"
    below = [r for r in rows if r["batch"] < batch]
    row = max(below, key=lambda r: r["batch"]) if below else min(rows, key=lambda r: r["batch"])
    return row, f"batch {batch} was not measured; the nearest measured batch ({row['batch']}) stands in"


def one_row(data: dict, part: str) -> dict | None:
    rows = rows_of(data, part)
    return rows[0] if rows else None


def one_row_any(data: dict, part: str) -> dict | None:
    return next((r for r in data["rows"] if r.get("part") == part), None)


def find_row(data: dict, test) -> dict | None:
    return next((r for r in data["rows"] if test(str(r.get("part", ""))) and r.get("images_per_s")), None)


# ---------------------------------------------------------------------------------------------
# The model of the cost


def speedup(gpus: int, efficiency: float) -> float:
    """Throughput of ``gpus`` GPUs in one DDP job over one GPU: S(g) = g * e^log2(g) (e = 1: linear)."""
    return gpus * efficiency ** math.log2(gpus)


def work(w: Workload) -> dict[str, float]:
    """Images each phase pushes through the train step and through the predict path.

    Counted as images, not steps: the last partial batch of an epoch is ignored (under one batch per
    epoch). Under budget=steps the cleaned run trains its baseline's step count, i.e. as many images
    as the baseline, over fewer rows (so more epochs, and more validation passes when V > 0).
    """
    n, k = w.train_images, w.folds
    cleaned_rows = n * (1 - w.flagged)
    cleaned_train = w.epochs * n if w.budget == "steps" else w.epochs * cleaned_rows
    return {
        "fold_train": w.epochs * n * (k - 1) / k,
        "fold_predict": n / k,
        "baseline_train": w.epochs * n,
        "baseline_predict": w.test_images + w.epochs * w.val_images,
        "cleaned_train": cleaned_train,
        "cleaned_predict": w.test_images + cleaned_train / cleaned_rows * w.val_images,
    }


def phase_hours(w: Workload, r: Rates, s: float) -> dict[str, float]:
    """Hours of one fold, one baseline and one cleaned retrain at throughput multiple ``s``."""
    im = work(w)

    def hours(phase: str) -> float:
        return (im[f"{phase}_train"] / (r.train * s) + im[f"{phase}_predict"] / (r.predict * s)) / 3600

    return {p: hours(p) for p in ("fold", "baseline", "cleaned")}


@dataclass(frozen=True)
class Layout:
    name: str
    gpus: int            # GPUs per job (DDP inside the job)
    fold_jobs: int       # folds trained at once, each in its own job (1: one after another)
    array: bool = False  # fold jobs of an array (`oof.folds=[i]` each), merged by a plain `oof`


def layouts(folds: int, gpu_counts: tuple[int, ...] = GPU_COUNTS) -> list[Layout]:
    out = [Layout("1 GPU (`trainer=gpu`)" if g == 1 else f"{g} GPUs, DDP in one job (`trainer=ddp "
                  f"trainer.devices={g}`)", g, 1) for g in gpu_counts]
    out += [Layout(f"SLURM array, {folds} fold jobs x {g} GPU{'s' if g > 1 else ''} (`oof.folds`)",
                   g, folds, array=True) for g in (1, max(gpu_counts))]
    return out


def project(w: Workload, r: Rates, lay: Layout, efficiency: float) -> dict[str, float]:
    """Wall hours of the OOF, of one seed pair's retrains and of the whole loop, and the GPU-hours."""
    h = phase_hours(w, r, speedup(lay.gpus, efficiency))
    rounds = math.ceil(w.folds / lay.fold_jobs)               # fold rounds of one k-fold run
    oof = w.repeats * rounds * h["fold"]
    pair = h["baseline"] + h["cleaned"]
    retrains = w.seeds * pair                                 # after the OOF, in one job of lay.gpus GPUs
    gpu_h = lay.gpus * (w.repeats * w.folds * h["fold"] + retrains)
    return {"oof": oof, "pair": pair, "total": oof + retrains, "gpu_h": gpu_h,
            "fold": h["fold"], "baseline": h["baseline"], "cleaned": h["cleaned"]}


# ---------------------------------------------------------------------------------------------
# The page


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def fmt_h(h: float) -> str:
    return f"{h:.2f}"


def fmt_n(x: float) -> str:
    return f"{x:,.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def table(head: list[str], rows: list[list[str]], align: str) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def page(a: argparse.Namespace, argv: list[str]) -> str:
    data = load_json(Path(a.json))
    comp = load_json(Path(a.compile_json)) if a.compile_json and Path(a.compile_json).is_file() else None
    d = conf_defaults()
    w = Workload(train_images=a.train_images, test_images=a.test_images, val_images=a.val_images,
                 epochs=a.epochs, batch=a.batch, budget=a.budget, folds=a.folds, repeats=a.repeats,
                 seeds=a.seeds, flagged=a.flagged)
    train_row, train_note = pick_batch(rows_of(data, TRAIN_PART), w.batch)
    pred_row, pred_note = pick_batch(rows_of(data, PREDICT_PART), w.batch)
    r = Rates(train=train_row["images_per_s"], predict=pred_row["images_per_s"])
    eff = a.ddp_efficiency
    trains = sorted(rows_of(data, TRAIN_PART), key=lambda x: x["batch"])
    out: list[str] = []
    say = out.append

    say("# Scaling: the team's k-fold OOF and retrains on 1, 2 and 8 GPUs and on a SLURM array")
    say("")
    say(f"Generated by `python {shlex.join(['bench/scaling.py', *argv])}`; do not edit, regenerate "
        "(tests/test_scaling.py fails when this page and the script's output differ):")
    say("")
    say("```bash")
    say("python bench/scaling.py > docs/scaling.md")
    say("```")
    say("")
    say(f"- Measurements: `{rel(Path(a.json))}` (bench/RESULTS.md B6): {data.get('machine', '?')}; "
        f"{data.get('date', '?')}, commit {data.get('commit', '?')}; {data.get('versions', '?')}.")
    if comp:
        say(f"- Compile speed-ups: `{rel(Path(a.compile_json))}`: {comp.get('machine', '?')}; "
            f"{comp.get('date', '?')}, commit {comp.get('commit', '?')}.")
    cfg = data.get("config", {})
    if cfg:
        say(f"- Model measured: a random-init MedSigLIP-shaped vision tower ({cfg.get('num_hidden_layers')} "
            f"layers, width {cfg.get('hidden_size')}, {cfg.get('image_size')} px, patch "
            f"{cfg.get('patch_size')}), {data.get('gflops_per_image', 0):.0f} GFLOP per image forward, bf16.")
    say("- Workload (each a command-line option of the script; defaults in parentheses where they come from):")
    say(f"  - train images N = {fmt_n(w.train_images)} (the team's dermatology train split); "
        f"flagged and pruned f = {w.flagged:.1%} (the team's flag rate)")
    say(f"  - test images T = {fmt_n(w.test_images)}: **assumed** (the team's test split size is not known "
        f"here; default {TEST_FRACTION:.0%} of N); val images V = {fmt_n(w.val_images)}: **assumed** "
        "(a manifest's val rows are validated once per epoch in each retrain, never in the folds)")
    epochs_src = d["epochs_src"] if w.epochs == d["epochs"] else "command line"
    say(f"  - epochs E = {w.epochs} ({epochs_src}"
        + ("" if d["own_recipe"] else f"; model={MODEL} has no conf/recipe_model/{MODEL}.yaml, so the "
           "recipe default applies") + f"), batch {w.batch} per device ({d['batch_src']}), "
        f"recipe.budget={w.budget} ({d['budget_src']})")
    say(f"  - folds k = {w.folds}, oof.repeats R = {w.repeats} (conf/oof/kfold.yaml); seed pairs "
        f"P = {w.seeds} ({d['seeds_src']}; `compare.seeds=N` for more)")
    say(f"  - DDP efficiency e = {eff} per doubling of GPUs: **assumed, not measured** (B6 ran one GPU)")
    say("")

    # --- measured per-image costs
    say("## Measured per-image costs (one GPU)")
    say("")
    rows = [[f"train step, batch {x['batch']}", f"{x['images_per_s']:.1f}", f"{1 / x['images_per_s']:.5f}",
             "used" if x is train_row else ""] for x in trains]
    for part in (PREDICT_PART, "predict (training.predict, image cache)"):
        x = one_row(data, part)
        if x:
            rows.append([f"{part}, batch {x['batch']}", f"{x['images_per_s']:.1f}",
                         f"{1 / x['images_per_s']:.5f}", "used" if x is pred_row else ""])
    fwd, _ = pick_batch(rows_of(data, "forward"), w.batch)
    rows.append([f"bare forward (bf16), batch {fwd['batch']}", f"{fwd['images_per_s']:.1f}",
                 f"{1 / fwd['images_per_s']:.5f}", ""])
    out += table(["part", "images/s", "GPU-s per image", ""], rows, "lrrl")
    say("")
    gain = trains[-1]["images_per_s"] / trains[-2]["images_per_s"] - 1 if len(trains) > 1 else 0.0
    say(f"- Train: {r.train:.1f} images/s = {1 / r.train:.5f} GPU-s per image ({train_note}"
        + (f"; train images/s rose {gain:.1%} from batch {trains[-2]['batch']} to {trains[-1]['batch']}, "
           "so the larger batch is unlikely to be much faster" if train_row["batch"] != w.batch else "")
        + "). One train image costs "
        f"{r.predict / r.train:.2f}x a predicted one (forward + backward + optimizer).")
    say(f"- Predict: {r.predict:.1f} images/s = {1 / r.predict:.5f} GPU-s per image ({pred_note}); "
        "the OOF's held-out fold, the test split and val all go through this path.")
    say("")

    # --- the formula
    say("## How the projection is computed")
    say("")
    say("```text")
    say("S(g)      = g * e^log2(g)                      throughput of g GPUs in one DDP job (e = 1: linear)")
    say("fold(g)   = [E*N*(k-1)/k / r_train + (N/k) / r_pred] / S(g)")
    say("base(g)   = [E*N / r_train + (T + E*V) / r_pred] / S(g)")
    say("clean(g)  = [E*N' / r_train + (T + E'*V) / r_pred] / S(g)")
    say("            budget=steps: N' = N (the baseline's steps), E' = E/(1-f);  budget=epochs: N' = N*(1-f), E' = E")
    say("OOF       = R * ceil(k / jobs) * fold(g)           jobs = fold jobs running at once (1 = one after another)")
    say("total     = OOF + P * (base(g) + clean(g))        the retrains run after the OOF, in one job of g GPUs")
    say("GPU-h     = g * (R * k * fold(g) + P * (base(g) + clean(g)))")
    say("```")
    say("")
    say(f"r_train = {r.train:.1f} and r_pred = {r.predict:.1f} images/s are the measured rates above. Not "
        "counted: model loading and process start per fit, warm-up, the CPU steps `flag`, `review`, "
        "`prune` and `compare` (bench/RESULTS.md B1 times the flag computation at this size), the partial "
        "last batch of "
        "each epoch, and queueing on a cluster. Grouped folds differ a little in size; the projection "
        "uses N/k each, so a fold-parallel wall is set by the largest fold, slightly above the figure here. "
        f"Under DDP the batch stays {w.batch} per device, so g GPUs take g x {w.batch} images per optimizer "
        "step: the same images in 1/g the steps (whether the recipe's learning rate suits that batch is "
        "outside this projection).")
    say("")

    # --- the work
    im = work(w)
    say("## Work, in images through the GPU")
    say("")
    h1 = phase_hours(w, r, 1.0)
    rows = [["one fold (k-1 of k parts trained, 1 part predicted)", fmt_n(im["fold_train"]),
             fmt_n(im["fold_predict"]), fmt_h(h1["fold"])],
            [f"OOF: {w.repeats} x {w.folds} folds", fmt_n(w.repeats * w.folds * im["fold_train"]),
             fmt_n(w.repeats * w.folds * im["fold_predict"]), fmt_h(w.repeats * w.folds * h1["fold"])],
            ["baseline retrain + test (+ val)", fmt_n(im["baseline_train"]), fmt_n(im["baseline_predict"]),
             fmt_h(h1["baseline"])],
            [f"cleaned retrain + test (+ val), {fmt_n(w.train_images * (1 - w.flagged))} rows",
             fmt_n(im["cleaned_train"]), fmt_n(im["cleaned_predict"]), fmt_h(h1["cleaned"])]]
    out += table(["phase", "images trained", "images predicted", "GPU-hours (1 GPU)"], rows, "lrrr")
    say("")

    # --- the projection
    say("## Projected wall time (hours)")
    say("")
    say(f"\"linear\" = ideal scaling, S(g) = g; \"e={eff}\" = the assumed DDP efficiency per doubling "
        f"(S(2) = {speedup(2, eff):.2f}, S(8) = {speedup(8, eff):.2f}): an assumption, not a measurement. "
        f"Per pair = one baseline + one cleaned retrain, each with its test prediction; total = OOF + "
        f"{w.seeds} pair(s). GPU-hours use e={eff}.")
    say("")
    rows = []
    for lay in layouts(w.folds):
        lin, asm = project(w, r, lay, 1.0), project(w, r, lay, eff)
        gpus = f"{lay.fold_jobs} x {lay.gpus}" if lay.fold_jobs > 1 else str(lay.gpus)
        rows.append([lay.name, gpus,
                     fmt_h(lin["oof"]), fmt_h(asm["oof"]), fmt_h(lin["pair"]), fmt_h(asm["pair"]),
                     fmt_h(lin["total"]), fmt_h(asm["total"]), fmt_h(asm["gpu_h"])])
    out += table(["layout", "GPUs", "OOF linear", f"OOF e={eff}", "per pair linear", f"per pair e={eff}",
                  "total linear", f"total e={eff}", "GPU-h"], rows, "lrrrrrrrr")
    say("")
    arr = [lay for lay in layouts(w.folds) if lay.array]
    one = project(w, r, arr[0], eff)
    beside = max(w.repeats * one["fold"], w.seeds * one["baseline"]) + w.seeds * one["cleaned"]
    say(f"- The SLURM array rows run the {w.folds} folds as {w.folds} jobs at once (OOF wall = one fold; "
        "the OOF is merged when all are done), then the retrains in one job of the same size: "
        "`cleanloop cycle -m hydra/launcher=slurm` sends its folds out as one array job and goes on with the "
        "retrains when they are done (`oof.fan_out=auto`), or `cleanloop oof -m 'oof.folds=[0],[1],...' "
        "hydra/launcher=slurm`, then `cleanloop cycle` (README \"Folds as parallel jobs\"). Projected from "
        "the per-image costs; no cluster run measured it.")
    say(f"- The baseline needs no OOF: run as a job of its own beside the fold jobs (`cleanloop train "
        f"role=baseline`, built), the {w.folds} x {arr[0].gpus}-GPU array would finish in {fmt_h(beside)} h "
        f"instead of {fmt_h(one['total'])} h (e={eff}), with one more job.")
    say("")

    # --- the image cache
    say("## The image cache: the model is the bottleneck, not the loader")
    say("")
    jpeg = find_row(data, lambda p: p.startswith("loader (") and "image cache" not in p)
    cached = find_row(data, lambda p: p.startswith("loader (") and "image cache" in p)
    build = find_row(data, lambda p: p.startswith("image cache build"))
    pred_c = one_row(data, "predict (training.predict, image cache)")
    verdict = one_row_any(data, "verdict")
    if verdict and verdict.get("note"):
        say(f"B6's verdict at batch {verdict.get('batch')}: {verdict['note']}.")
        say("")
    if jpeg and cached:
        rows = [[str(g), fmt_n(g * r.train), fmt_n(g * r.predict), ratio(jpeg["images_per_s"], g * r.predict),
                 ratio(cached["images_per_s"], g * r.predict)] for g in GPU_COUNTS]
        out += table(["GPUs fed by one node", "train needs images/s", "predict needs images/s",
                      f"{jpeg['part']}: {jpeg['images_per_s']:.0f} images/s covers predict",
                      f"{cached['part']}: {cached['images_per_s']:.0f} images/s covers predict"],
                     rows, "rrrrr")
        say("")
        say(f"- On one GPU the JPEG-decoding loader ({jpeg['images_per_s']:.0f} images/s) delivers "
            f"{ratio(jpeg['images_per_s'], r.train)} what training consumes and "
            f"{ratio(jpeg['images_per_s'], r.predict)} what predict consumes"
            + (f"; predict ran at {pred_row['images_per_s']:.1f} images/s decoding JPEGs and "
               f"{pred_c['images_per_s']:.1f} from the cache" if pred_c else "")
            + ". So the cache saves no GPU time there: the projections above hold with or without it, "
            "and the workers' CPU time is what it saves.")
        over = [g for g in GPU_COUNTS if g * r.predict > jpeg["images_per_s"]]
        if over:
            say(f"- At {' and '.join(map(str, over))} GPUs in one node the GPUs' predict demand exceeds B6's decode rate "
                f"(measured with {jpeg['part'].removeprefix('loader (').rstrip(')')} on the machine above). "
                "Each DDP rank starts its own `data.num_workers` workers, so the node's decode rate grows "
                "with its cores, which B6 did not measure. The cached loader's measured rate covers "
                f"{ratio(cached['images_per_s'], max(GPU_COUNTS) * r.predict)} of {max(GPU_COUNTS)} GPUs' "
                "predict demand: on a multi-GPU node, build the cache (`cleanloop cache`, then "
                "`data.cache=true`) so that the projections' premise, a model-bound GPU, holds.")
        size = cfg.get("image_size")
        if size:
            n_all = w.train_images + w.test_images + w.val_images
            gb = n_all * size * size * 3 / 1e9
            say(f"- The raw cache of the manifest's N + T + V = {fmt_n(n_all)} images at {size} px is {gb:.1f} GB ({size}x{size}x3 bytes each; "
                "`data.cache_format=auto` falls back to JPEG at the model's size above `data.cache_max_gb`)"
                + (f"; built at B6's {build['images_per_s']:.1f} images/s ({build['part']}, start-up "
                   f"included) it takes {n_all / build['images_per_s'] / 3600:.2f} h once, and one "
                   "build serves every fold, both retrains and every seed" if build else "") + ".")
        say("")

    # --- torch.compile
    if comp:
        ct = pick_batch(rows_of(comp, "train (torch.compile)"), w.batch)[0] if rows_of(
            comp, "train (torch.compile)") else None
        cf = pick_batch(rows_of(comp, "forward (torch.compile)"), w.batch)[0] if rows_of(
            comp, "forward (torch.compile)") else None
        if ct and cf:
            et = pick_batch(rows_of(comp, TRAIN_PART), ct["batch"])[0]
            ef = pick_batch(rows_of(comp, "forward"), cf["batch"])[0]
            st, sf = ct["images_per_s"] / et["images_per_s"], cf["images_per_s"] / ef["images_per_s"]
            rc = Rates(train=r.train * st, predict=r.predict * sf)
            fits = w.repeats * w.folds + 2 * w.seeds
            secs = [float(m.group(1)) for x in (ct, cf) for m in [re.search(r"(\d+(?:\.\d+)?) s", x.get("note", ""))]
                    if m]
            say("## With `model.compile=true`")
            say("")
            say(f"Measured in one run (eager against compiled): train {st:.2f}x at batch {ct['batch']}, "
                f"forward {sf:.2f}x at batch {cf['batch']}. Assuming the train speed-up holds at batch "
                f"{w.batch} and the forward's applies to the predict path, the 1-GPU total falls from "
                f"{fmt_h(project(w, r, layouts(w.folds)[0], 1.0)['total'])} h to "
                f"{fmt_h(project(w, rc, layouts(w.folds)[0], 1.0)['total'])} h, and every other row by the "
                "same share"
                + (f", plus up to {max(secs):.0f} s of compiling and warm-up per fit ({fits} fits: "
                   f"{fits * max(secs) / 3600:.2f} h at most, on the JSON's compile + warm-up + timed-steps "
                   "wall)" if secs else "") + ". It is off by default; turn it on for runs this long.")
            say("")

    # --- the commands
    say("## Commands that scale it out")
    say("")
    say("As README.md \"Sweeps, caching and scale-out\" documents them (`...` = your data and model "
        "overrides, e.g. `data=manifest data.manifest=/data/derm/train.csv data.name=derm model=medsiglip`):")
    say("")
    say("```bash")
    say("cleanloop cache ...                                      # once: decode + resize every image")
    say("cleanloop cycle ... trainer=gpu data.cache=true          # 1 GPU: folds one after another")
    say("cleanloop cycle ... trainer=ddp trainer.devices=2 data.cache=true   # 2 GPUs, DDP in one job")
    say("cleanloop cycle ... trainer=ddp trainer.devices=8 data.cache=true   # 8 GPUs (trainer=ddp alone: all)")
    say("# SLURM (pip install -e .[launchers]): one job per sweep point, each job as one of the rows above")
    say("cleanloop cycle -m hydra/launcher=slurm hydra.launcher.partition=a100 \\")
    say("    hydra.launcher.gpus_per_node=8 trainer=ddp trainer.devices=8 data.cache=true ...")
    say("```")
    say("")
    say("Under SLURM a sweep `-m ... recipe.seed=0,1,2` or "
        "`flag.filter_by=both,confident_learning` gives one job per value (at most "
        "`hydra.launcher.array_parallelism` at once), and each job sends its folds out as an array of its "
        "own with the job's resources (`oof.fan_out=auto`; with `oof.fan_out=false` it trains them one after "
        "another, at the wall time of its GPU count above); the fold-array rows are that, or a fold multirun "
        "(`oof.folds=[i]` per job) before the cycle. For parallel jobs point `tracking.uri` at an MLflow "
        "server (README: SQLite serialises every write).")
    limit = slurm_timeout_min()
    if limit:
        fits = [lay for lay in layouts(w.folds) if not lay.array
                and project(w, r, lay, eff)["total"] * 60 <= limit]
        say("")
        say(f"conf/hydra/launcher/slurm.yaml sets `timeout_min: {limit}` ({limit / 60:g} h); of the one-job "
            f"rows above (e={eff}) "
            + ("the " + " and ".join(f"{lay.gpus}-GPU" for lay in fits)
               + (" row fits" if len(fits) == 1 else " rows fit") + " in it" if fits else "none fits in it")
            + "; for the others raise `hydra.launcher.timeout_min` (within the partition's limit) or run the "
            "steps as separate jobs (`cleanloop oof`, then `flag`, `prune`, `train`; finished folds are "
            "kept, so a resubmitted `oof` trains only the folds not yet finished).")
    return "\n".join(out) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    d = conf_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", default=str(REPO / DEFAULT_JSON), help="bench/gpu.py's raw results (B6)")
    p.add_argument("--compile-json", default=str(REPO / DEFAULT_COMPILE_JSON),
                   help="bench/gpu.py --compile-only's raw results; '' to leave the section out")
    p.add_argument("--train-images", type=int, default=TEAM_TRAIN_IMAGES, help="N")
    p.add_argument("--test-images", type=int, default=None, help=f"T (default: {TEST_FRACTION:.0%} of N, assumed)")
    p.add_argument("--val-images", type=int, default=0, help="V (assumed)")
    p.add_argument("--flagged", type=float, default=FLAGGED_FRACTION, help="f, share of train rows pruned")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"E ({d['epochs_src']})")
    p.add_argument("--batch", type=int, default=d["batch"], help=f"per device ({d['batch_src']})")
    p.add_argument("--budget", choices=("steps", "epochs"), default=d["budget"], help="recipe.budget")
    p.add_argument("--folds", type=int, default=d["folds"], help="k (conf/oof/kfold.yaml)")
    p.add_argument("--repeats", type=int, default=d["repeats"], help="R, oof.repeats")
    p.add_argument("--seeds", type=int, default=d["seeds"], help=f"P, compare.seeds ({d['seeds_src']})")
    p.add_argument("--ddp-efficiency", type=float, default=DDP_EFFICIENCY,
                   help="e, throughput kept per doubling of GPUs (assumed)")
    a = p.parse_args(argv)
    if a.test_images is None:
        a.test_images = round(TEST_FRACTION * a.train_images)
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.stdout.write(page(parse(argv), argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
