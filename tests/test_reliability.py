"""Part of the reliability issue: atomic writes survive a kill, secrets never reach the store."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanloop.oof_file import oof_frame, write_oof

from conftest import run_cli

WRITER = """
import sys, time
from cleanloop.io import write_atomic
target, started = sys.argv[1], sys.argv[2]
def writer(path):
    with open(path, "w") as f:
        for i in range(100000):
            f.write("x" * 1000 + "\\n")
            f.flush()
            if i == 50:
                open(started, "w").close()
            time.sleep(0.001)
write_atomic(target, writer)
"""


@pytest.mark.parametrize("old", ["old contents\n", None])
def test_a_killed_writer_leaves_the_old_file_or_none(tmp_path, old):
    target, started = tmp_path / "label_issues.csv", tmp_path / "started"
    if old is not None:
        target.write_text(old)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(started)])
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert started.exists(), "the writer never started"
    proc.kill()  # SIGKILL mid-write: no cleanup code runs
    proc.wait()
    if old is None:
        assert not target.exists()
    else:
        assert target.read_text() == old


def test_a_planted_hf_token_never_reaches_mlflow_or_outputs(tiny_manifest, tmp_path):
    token = "hf_PlantedSecret0123456789abcdef"
    m = pd.read_csv(tiny_manifest, dtype=str)
    t = m[m["split"] == "train"]
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=len(t))
    oof = write_oof(tmp_path / "oof.parquet", oof_frame(t["image_uuid"], t["label"], np.zeros(len(t)), probs,
                                                        ["bright", "dark", "mid"]), classes=["bright", "dark", "mid"])
    r = run_cli("flag", "data=manifest", f"data.manifest={tiny_manifest}", f"flag.oof={oof}",
                f"paths.root_dir={tmp_path}", cwd=tmp_path, env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    leaked = [p for p in Path(tmp_path).rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaked and token not in r.stdout + r.stderr
