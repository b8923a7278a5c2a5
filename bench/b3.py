"""B3: throughput of the OOF prediction path against the bare model forward, with and without the image cache.

The OOF path is what ``cleanloop oof`` runs for each held-out fold: manifest rows ->
``ManifestDataModule`` (decode, pad, resize; or read the image cache) -> Lightning predict ->
``oof_file.write_oof`` (Parquet). The bare forward is ``Classifier.forward`` in inference mode on
pre-made uint8 batches of the same size, on the same threads. Images are synthetic photo-like 4:3
JPEGs (bench/gpu.py's ``write_jpegs``), so the loader decodes, pads and resizes as for real photos.

The model is a small SigLIP at 224 px (6 layers, width 384: a ViT-S/16 cut to half depth) so that
the model, not Python overhead, is most of the work, as it is for MedSigLIP, while a run stays
within a few minutes on 2 cores. Prints one JSON line last.

    python bench/b3.py [--images 384] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

B3_MODEL = dict(image_size=224, patch_size=16, hidden_size=384, intermediate_size=1536,
                num_hidden_layers=6, num_attention_heads=6)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: decode in the main process)")
    a = p.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch
    from gpu import build, compose_cfg, write_jpegs

    from cleanloop.oof_file import oof_frame, write_oof
    from cleanloop.training import make_datamodule, predict

    model, classes = build(B3_MODEL, torch.device("cpu"))
    model.eval()
    size, bs = B3_MODEL["image_size"], a.batch
    out: dict = {"model": B3_MODEL, "images": a.images, "batch": bs, "threads": torch.get_num_threads(),
                 "num_workers": a.num_workers}
    with tempfile.TemporaryDirectory(prefix="cleanloop-b3-") as tmp:
        root = Path(tmp)
        (root / "img").mkdir()
        files = write_jpegs(root / "img", a.images, size=size)
        frame = pd.DataFrame({"image_uuid": [f"{i:06d}" for i in range(a.images)], "abs_path": files,
                              "label": [classes[i % len(classes)] for i in range(a.images)]})
        n_batches = -(-a.images // bs)
        x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8)

        def bare() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(n_batches):
                    model(x[: min(bs, a.images - i * bs)])
            return a.images / (time.perf_counter() - t0)

        def oof_path(cfg) -> float:
            t0 = time.perf_counter()
            pred = predict(cfg, model, {"fold": frame})["fold"]
            df = oof_frame(pred.uuids, frame["label"], np.zeros(a.images, dtype=int), pred.probs, classes)
            write_oof(root / "oof_probs.parquet", df, classes=classes)
            return a.images / (time.perf_counter() - t0)

        def loader_only(cfg) -> float:
            loader = make_datamodule(cfg, classes, None, predict={"fold": frame}).predict_dataloader()[0]
            t0 = time.perf_counter()
            seen = sum(len(b["label"]) for b in loader)
            return seen / (time.perf_counter() - t0)

        cfgs = {c: compose_cfg(root, smoke=True, size=size, batch=bs, num_workers=a.num_workers, cache=c)
                for c in (False, True)}
        t0 = time.perf_counter()
        make_datamodule(cfgs[True], classes, None, predict={"fold": frame}).predict_dataloader()  # builds it
        out["cache_build_images_per_s"] = a.images / (time.perf_counter() - t0)
        oof_path(cfgs[False])  # warm-up: first Trainer, allocator, page cache
        runs: dict[str, list[float]] = {k: [] for k in ("bare", "oof_decode", "oof_cache", "loader_decode",
                                                        "loader_cache")}
        for _ in range(a.repeats):  # interleaved, so that load from other work hits every case alike
            runs["bare"].append(bare())
            runs["oof_decode"].append(oof_path(cfgs[False]))
            runs["oof_cache"].append(oof_path(cfgs[True]))
            runs["loader_decode"].append(loader_only(cfgs[False]))
            runs["loader_cache"].append(loader_only(cfgs[True]))
    for k, v in runs.items():  # images/s: max is the best run, median the typical one
        out[k] = (max(v), statistics.median(v))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
