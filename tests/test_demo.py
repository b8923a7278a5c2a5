"""The embedded demo dataset (CONTRACT §5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from cleanloop.demo import CLASS_NAMES, build_demo, flip_labels, noise_matrix
from cleanloop.manifest import load_manifest


def test_demo_noise_rate_and_ground_truth(demo_dir):
    m = load_manifest(demo_dir / "manifest.csv")  # validates, and every image exists
    truth = pd.read_csv(demo_dir / "ground_truth.csv", keep_default_na=False)
    df = m.df.merge(truth, on="image_uuid", validate="1:1")
    train = df[df["split"] == "train"]
    digits = train[~train["is_garbage"]]
    rate = (digits["label"] != digits["true_label"]).mean()
    assert abs(rate - 0.15) <= 0.03
    # ground truth agrees with the labels: is_noisy exactly where given != true
    assert (digits["is_noisy"] == (digits["label"] != digits["true_label"])).all()
    test = df[df["split"] == "test"]
    assert not test["is_noisy"].any() and (test["label"] == test["true_label"]).all()
    garbage = df[df["is_garbage"]]
    assert len(garbage) == 12 and (garbage["split"] == "train").all() and set(garbage["label"]) <= set(CLASS_NAMES)
    assert m.classes == sorted(CLASS_NAMES)
    # groups never mix splits
    assert df.groupby("group")["split"].nunique().max() == 1
    img = Image.open(df["abs_path"].iloc[0])
    assert img.size == (32, 32)


def test_demo_is_seeded(tmp_path, demo_dir):
    again = build_demo(tmp_path / "demo")
    assert again.read_bytes() == (demo_dir / "manifest.csv").read_bytes()
    assert (tmp_path / "demo" / "ground_truth.csv").read_bytes() == (demo_dir / "ground_truth.csv").read_bytes()


def test_noise_is_class_conditional_and_exact():
    nm = noise_matrix(10, 0.15, seed=3)
    assert np.allclose(nm.sum(0), 1.0) and (nm >= 0).all()
    labels = np.repeat(np.arange(10), 100)
    noisy = flip_labels(labels, nm, seed=3)
    per_class = np.array([(noisy[labels == j] != j).mean() for j in range(10)])
    assert np.allclose(per_class, 1 - np.diag(nm), atol=0.011)
    assert abs((noisy != labels).mean() - 0.15) < 0.005
