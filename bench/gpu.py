"""B6: a MedSigLIP-shaped model on one GPU: is the model fast, and is the OOF/predict path loader-bound?

1. Forward and train-step images/s of a random-init SiglipVisionModel (MedSigLIP's shape, SDPA
   attention) inside ``cleanloop.model.Classifier`` (25 classes), bf16 autocast, over batch sizes;
   model FLOP utilisation against ``--peak-tflops`` (H100 SXM dense BF16: 989).
2. The real predict path, ``cleanloop.training.predict`` over a ``ManifestDataModule`` of
   synthetic JPEGs (non-square, so the loader pads and resizes as for real photos), next to the
   same loader iterated alone: if predict runs at the loader's speed, below the model's, it is
   loader-bound.

FLOPs per image are analytic: 2 x (patch-embedding and encoder weight-matrix parameters) x tokens
for the matmuls, plus 4 x layers x tokens^2 x width for attention scores and their use; a train
step counts 3x the forward. The pooling head (one query token) adds under 1% and is left out.

    python bench/gpu.py            # CUDA, under 5 minutes; prints a table last
    python bench/gpu.py --smoke    # CPU, tiny shape, a few steps: keeps this script from rotting
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEDSIGLIP = dict(image_size=448, patch_size=14, hidden_size=1152, intermediate_size=4304,
                 num_hidden_layers=27, num_attention_heads=16)
TINY = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4)
N_CLASSES = 25


def flops_per_image(backbone, config: dict) -> float:
    """Forward FLOPs of one image (see the module docstring)."""
    tokens = (config["image_size"] // config["patch_size"]) ** 2
    matmul_params = sum(p.numel() for name, p in backbone.named_parameters()
                        if p.ndim >= 2 and name.startswith(("embeddings.patch_embedding", "encoder.")))
    attention = 4 * config["num_hidden_layers"] * tokens**2 * config["hidden_size"]
    return 2 * matmul_params * tokens + attention


def build(config: dict, device):
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from cleanloop.model import Classifier

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 400M parameters are slow to init on a CPU
        backbone = SiglipVisionModel(SiglipVisionConfig(**config, attn_implementation="sdpa"))
    classes = [f"class_{i:02d}" for i in range(N_CLASSES)]
    return Classifier(backbone, classes).to(device), classes


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, *, warmup: int, steps: int, device) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _step(model, kind: str, x, y, *, cuda: bool, fused: bool | None = None):
    """One forward (inference mode) or one train step (AdamW, fused on CUDA unless ``fused=False``), in
    bf16 autocast on CUDA."""
    import torch

    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)
    if kind == "forward":
        model.eval()

        def forward():
            with torch.inference_mode(), autocast:
                model(x)
        return forward

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda if fused is None else fused)

    def train_step():
        with autocast:
            loss = model.loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train_step


def sweep(model, *, kind: str, batch_sizes: list[int], size: int, warmup: int, steps: int, device,
          flops: float, peak: float, label: str | None = None, fused: bool | None = None) -> list[dict]:
    """images/s of forward (``kind="forward"``) or train steps over batch sizes; OOM rows say so."""
    import torch

    cuda = device.type == "cuda"
    rows = []
    for bs in batch_sizes:
        row = {"part": label or kind, "batch": bs}
        x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, device=device)
        y = torch.randint(0, N_CLASSES, (bs,), device=device)
        step = _step(model, kind, x, y, cuda=cuda, fused=fused)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            sec = _time_steps(step, warmup=warmup, steps=steps, device=device)
        except torch.cuda.OutOfMemoryError:
            row.update(note="out of memory")
            model.zero_grad(set_to_none=True)
        else:
            ips = bs / sec
            achieved = ips * flops * (1 if kind == "forward" else 3)
            row.update(images_per_s=ips, ms_per_step=1e3 * sec, tflops=achieved / 1e12, mfu=achieved / peak)
            if cuda:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(json.dumps(row), flush=True)  # as it goes: a run cut short still shows what it measured
        finally:
            step = x = y = None  # free before the next size (the optimizer state lives in step)
        rows.append(row)
    model.zero_grad(set_to_none=True)
    return rows


def write_jpegs(folder: Path, n: int, *, size: int, seed: int = 0) -> list[str]:
    """``n`` photo-like JPEGs, 4:3 and larger than ``size``, so the loader pads and resizes them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = math.ceil(size * 4 / 3), size
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth colour fields, photo-sized files
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def compose_cfg(root: Path, *, smoke: bool, size: int, batch: int, num_workers: int | None, cache: bool = False):
    """The project's own config tree, composed as the steps compose it, for the predict path."""
    from hydra import compose, initialize_config_dir

    from cleanloop.config import conf_dir, register_resolvers

    register_resolvers()
    overrides = [f"paths.root_dir={root}", "data=manifest", f"data.manifest={root}/manifest.csv",
                 f"trainer={'cpu' if smoke else 'gpu'}", f"model.image_size={size}",
                 f"recipe.batch_size={batch}", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", f"data.cache={str(cache).lower()}", "data.cache_format=raw"]
    if num_workers is not None:
        overrides.append(f"data.num_workers={num_workers}")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def predict_path(model, classes, *, size: int, batch: int, steps: int, n_files: int, smoke: bool,
                 num_workers: int | None) -> list[dict]:
    """Loader alone, then cleanloop.training.predict, over the same ``steps * batch`` manifest rows."""
    import pandas as pd

    from cleanloop.training import make_datamodule, predict

    with tempfile.TemporaryDirectory(prefix="cleanloop-b6-") as tmp:
        root = Path(tmp)
        (root / "img").mkdir()
        files = write_jpegs(root / "img", n_files, size=size)
        n = steps * batch  # rows reuse the files (decoded afresh each time; the page cache keeps them)
        frame = pd.DataFrame({"image_uuid": [f"{i:08d}" for i in range(n)],
                              "abs_path": [files[i % len(files)] for i in range(n)],
                              "label": [classes[i % len(classes)] for i in range(n)]})
        rows = []
        for cache in (False, True):
            cfg = compose_cfg(root, smoke=smoke, size=size, batch=batch, num_workers=num_workers, cache=cache)
            workers, tag = int(cfg.data.num_workers), ", image cache" if cache else ""
            t0 = time.perf_counter()
            dm = make_datamodule(cfg, classes, None, predict={"bench": frame})
            loader = dm.predict_dataloader()[0]  # with the cache this builds it (n_files distinct images)
            if cache:
                rows.append({"part": f"image cache build ({n_files} files)", "batch": batch,
                             "images_per_s": n_files / (time.perf_counter() - t0)})
            t0 = time.perf_counter()
            seen = sum(len(b["label"]) for b in loader)
            loader_s = time.perf_counter() - t0
            del loader, dm  # ends its workers

            model.eval()
            t0 = time.perf_counter()
            out = predict(cfg, model, {"bench": frame})["bench"]
            predict_s = time.perf_counter() - t0
            assert len(out.uuids) == n and out.probs.shape == (n, len(classes))
            rows += [{"part": f"loader ({workers} workers{tag})", "batch": batch, "images_per_s": seen / loader_s,
                      "ms_per_step": 1e3 * loader_s / steps},
                     {"part": f"predict (training.predict{tag})", "batch": batch, "images_per_s": n / predict_s,
                      "ms_per_step": 1e3 * predict_s / steps}]
    return rows


def _ips(rows: list[dict], batch: int, match) -> float | None:
    return next((r["images_per_s"] for r in rows
                 if match(r["part"]) and r["batch"] == batch and "images_per_s" in r), None)


def _bound(model: float | None, loader: float | None, pred: float | None, what: str) -> str:
    if None in (model, loader, pred):
        return f"{what}: no verdict, a measurement is missing"
    figures = f"predict {pred:.0f} img/s, loader {loader:.0f} img/s, model {model:.0f} img/s"
    if pred < 0.8 * model and loader < 1.25 * pred:
        return f"{what}: loader-bound ({figures})"
    if pred >= 0.8 * model:
        return f"{what}: model-bound ({figures})"
    return f"{what}: neither, overheads ({figures})"


def verdict(rows: list[dict], batch: int) -> str:
    """Loader-bound or model-bound, decoding JPEGs and with the image cache."""
    model = _ips(rows, batch, lambda p: p == "forward")
    out = []
    for tag, what in (("", "decoding JPEGs"), (", image cache", "with the image cache")):
        loader = _ips(rows, batch, lambda p, t=tag: p.startswith("loader (") and p.endswith(f"workers{t})"))
        pred = _ips(rows, batch, lambda p, t=tag: p == f"predict (training.predict{t})")
        out.append(_bound(model, loader, pred, what))
    return "; ".join(out)


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| part | batch | images/s | ms/step | TFLOP/s | MFU | peak GiB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r.get('batch', '')} | {f(r.get('images_per_s'), '.1f')} | "
                     f"{f(r.get('ms_per_step'), '.1f')} | {f(r.get('tflops'), '.1f')} | "
                     f"{f(r.get('mfu'), '.1%')} | {f(r.get('peak_gib'), '.1f')} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few steps")
    p.add_argument("--forward-batches", default="32,64,128,256")
    p.add_argument("--train-batches", default="8,16,32,48")
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch size (after 3 warm-up steps)")
    p.add_argument("--predict-batch", type=int, default=64)
    p.add_argument("--predict-steps", type=int, default=200)
    p.add_argument("--num-workers", type=int, default=None, help="default: the config's data.num_workers")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile forward (compiling takes a minute)")
    p.add_argument("--compile-only", action="store_true",
                   help="only forward and train step, eager then torch.compile, at --predict-batch / --compile-train-batch")
    p.add_argument("--compile-train-batch", type=int, default=32)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)

    import torch

    if a.smoke:
        # One thread: on a busy CPU, two threads wait on each other for a time slice at every op.
        torch.set_num_threads(1)
        config, device, warmup = TINY, torch.device("cpu"), 1
        fwd, trn, steps = [2, 4], [2, 4], 2
        pbatch, psteps, n_files, workers = 4, 3, 4, 0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py needs CUDA; use --smoke for the CPU check")
        config, device, warmup = MEDSIGLIP, torch.device("cuda"), 3
        fwd, trn, steps = [int(b) for b in a.forward_batches.split(",")], [int(b) for b in a.train_batches.split(",")], a.steps
        pbatch, psteps, n_files, workers = a.predict_batch, a.predict_steps, 256, a.num_workers
        torch.backends.cuda.matmul.allow_tf32 = True
    if pbatch not in fwd:
        fwd = sorted({*fwd, pbatch})  # the verdict compares predict with the forward at its batch size

    t_start = time.perf_counter()
    model, classes = build(config, device)
    flops = flops_per_image(model.backbone, config)
    peak = a.peak_tflops * 1e12
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    print(f"B6 on {name}: SigLIP {config}, {flops / 1e9:.1f} GFLOP/image forward, peak {a.peak_tflops:g} TFLOP/s",
          flush=True)
    if a.compile_only:
        rows = compile_rows(model, config=config, device=device, warmup=warmup, steps=steps, flops=flops, peak=peak,
                            forward_batch=pbatch, train_batch=a.compile_train_batch if not a.smoke else 2)
        return finish(a, rows, name, config, flops, t_start)
    rows = sweep(model, kind="forward", batch_sizes=fwd, size=config["image_size"], warmup=warmup, steps=steps,
                 device=device, flops=flops, peak=peak)
    rows += sweep(model, kind="train", batch_sizes=trn, size=config["image_size"], warmup=warmup, steps=steps,
                  device=device, flops=flops, peak=peak)
    fit = [r["batch"] for r in rows if r["part"] == "train" and "images_per_s" in r]
    if device.type == "cuda" and fit:  # what the fused AdamW (cleanloop's default on CUDA) is worth
        rows += sweep(model, kind="train", batch_sizes=[max(fit)], size=config["image_size"], warmup=warmup,
                      steps=steps, device=device, flops=flops, peak=peak, label="train (AdamW not fused)", fused=False)
    model = model.cpu() if device.type == "cuda" else model  # predict's Trainer moves it back itself
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += predict_path(model, classes, size=config["image_size"], batch=pbatch, steps=psteps, n_files=n_files,
                         smoke=a.smoke, num_workers=workers)
    for r in rows[-5:]:
        print(json.dumps(r), flush=True)
    if device.type == "cuda" and not a.no_compile:  # model.compile=true: worth it? (compile time included apart)
        model = model.to(device)
        model.backbone.compile()
        t0 = time.perf_counter()
        rows += sweep(model, kind="forward", batch_sizes=[pbatch], size=config["image_size"], warmup=warmup,
                      steps=steps, device=device, flops=flops, peak=peak, label="forward (torch.compile)")
        rows[-1]["note"] = f"compile + warm-up + timed steps {time.perf_counter() - t0:.0f} s"
    rows.append({"part": "verdict", "batch": pbatch, "note": verdict(rows, pbatch)})
    return finish(a, rows, name, config, flops, t_start)


def compile_rows(model, *, config, device, warmup, steps, flops, peak, forward_batch, train_batch) -> list[dict]:
    """Forward and train step eager, then the same with the backbone compiled in place (what
    ``model.compile=true`` does); each compiled row notes its compile + warm-up + timed seconds."""
    size = config["image_size"]
    common = dict(size=size, warmup=warmup, steps=steps, device=device, flops=flops, peak=peak)
    rows = sweep(model, kind="forward", batch_sizes=[forward_batch], **common)
    rows += sweep(model, kind="train", batch_sizes=[train_batch], **common)
    model.backbone.compile()
    for kind, bs in (("forward", forward_batch), ("train", train_batch)):
        t0 = time.perf_counter()
        rows += sweep(model, kind=kind, batch_sizes=[bs], label=f"{kind} (torch.compile)", **common)
        rows[-1]["note"] = f"compile + warm-up + timed steps {time.perf_counter() - t0:.0f} s"
    return rows


def finish(a, rows: list[dict], name: str, config: dict, flops: float, t_start: float) -> dict:
    result = {"device": name, "config": config, "gflops_per_image": flops / 1e9, "peak_tflops": a.peak_tflops,
              "wall_s": time.perf_counter() - t_start, "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    print(f"total {result['wall_s']:.0f} s", flush=True)
    print(table(rows), flush=True)  # last: what a reader (and tests/test_bench.py) looks for
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
