"""Issue 15: the audit step on a tiny manifest with planted copies, and what it changes downstream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleanloop.folds import assign_folds
from cleanloop.steps import audit, compare, oof, train

from conftest import tiny_rows

TINY = ["data=manifest", "data.num_workers=0", "model=tiny", "model.image_size=16", "model.config.image_size=16",
        "recipe.batch_size=4", "recipe.epochs=1", "oof.n_folds=2"]


def _with_copies(root: Path) -> Path:
    """tiny_rows plus: a byte copy of train row dark-0 under another patient's group (train), and a
    byte copy of train row mid-1 in test."""
    rows = tiny_rows(root)
    shutil.copy(root / "img" / "dark-0.png", root / "img" / "dark-twin.png")
    shutil.copy(root / "img" / "mid-1.png", root / "img" / "mid-leak.png")
    extra = pd.DataFrame([
        {"image_uuid": "dark-twin", "path": "img/dark-twin.png", "label": "dark", "split": "train", "group": "patient-x"},
        {"image_uuid": "mid-leak", "path": "img/mid-leak.png", "label": "mid", "split": "test", "group": "patient-y"},
    ])
    path = root / "manifest.csv"
    pd.concat([rows, extra], ignore_index=True).to_csv(path, index=False)
    return path


def _straddling_seed(manifest: Path) -> int:
    """An oof.seed whose folds, by the manifest's own groups, put dark-0 and its twin apart."""
    train = pd.read_csv(manifest, dtype=str)
    train = train[train["split"] == "train"].reset_index(drop=True)
    a, b = (train.index[train["image_uuid"] == u][0] for u in ("dark-0", "dark-twin"))
    for seed in range(20):
        folds = assign_folds(train["label"].to_numpy(), n_folds=2, seed=seed, groups=train["group"].to_numpy())
        if folds[a] != folds[b]:
            return seed
    raise AssertionError("no seed separates the copies; the test data cannot show merging")


def test_audit_reports_the_copies_and_merged_groups_keep_them_in_one_fold(tmp_path, cfg_factory):
    manifest = _with_copies(tmp_path)
    seed = _straddling_seed(manifest)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}", f"oof.seed={seed}")
    info = audit.run(cfg)
    out = Path(info["out_dir"])
    pairs = pd.read_csv(out / "duplicates.csv", dtype=str, keep_default_na=False)
    linked = {frozenset((a, b)): (k, sa, sb) for a, b, k, sa, sb in
              pairs[["image_uuid_a", "image_uuid_b", "kind", "split_a", "split_b"]].itertuples(index=False)}
    assert linked[frozenset(("dark-0", "dark-twin"))] == ("exact", "train", "train")
    assert sorted(linked[frozenset(("mid-1", "mid-leak"))][1:]) == ["test", "train"]
    per_class = pd.read_csv(out / "leakage_per_class.csv", dtype={"class": str}).set_index("class")
    assert per_class.loc["mid", "train_test_pairs"] == 1 and per_class.loc["dark", "train_test_pairs"] == 0
    summary = json.loads((out / "audit_summary.json").read_text())
    assert summary["metrics"]["audit/leaks/train_test"] == 1

    oof.run(cfg)
    probs = pd.read_parquet(Path(cfg.paths.out_dir) / "oof" / "oof_probs.parquet").set_index("image_uuid")
    assert probs.loc["dark-0", "fold"] == probs.loc["dark-twin", "fold"]  # merged: one fold

    apart = cfg_factory(*TINY, f"data.manifest={manifest}", f"oof.seed={seed}", "audit.merge_groups=false")
    oof.run(apart)  # the manifest's groups only: the seed chosen above separates the copies
    probs = pd.read_parquet(Path(apart.paths.out_dir) / "oof" / "oof_probs.parquet").set_index("image_uuid")
    assert probs.loc["dark-0", "fold"] != probs.loc["dark-twin", "fold"]


def test_exclude_keeps_the_raw_numbers_and_adds_the_deleaked_ones(tmp_path, cfg_factory):
    manifest = _with_copies(tmp_path)
    base = [*TINY, f"data.manifest={manifest}"]
    audit.run(cfg_factory(*base))
    runs = [train.run(cfg_factory(*base, "role=baseline", f"recipe.seed={s}"))["run_id"] for s in (0, 1)]
    pair = [f"compare.baseline={runs[0]}", f"compare.cleaned={runs[1]}"]

    raw = compare.run(cfg_factory(*base, *pair))
    raw_table = pd.read_csv(Path(raw["dir"]) / "recall_deltas.csv")
    both = compare.run(cfg_factory(*base, *pair, "audit.test_leaks=exclude"))
    folder = Path(both["dir"])
    pd.testing.assert_frame_equal(pd.read_csv(folder / "recall_deltas.csv"), raw_table)  # raw numbers kept
    assert both["balanced_accuracy"] == raw["balanced_accuracy"] and both["n_test"] == raw["n_test"] == 7
    assert both["deleaked"]["n_excluded"] == 1 and both["deleaked"]["n_test"] == 6
    deleaked = pd.read_csv(folder / "recall_deltas_deleaked.csv", dtype={"class": str}).set_index("class")
    assert deleaked["n_test"].sum() == 6 and deleaked.loc["mid", "n_test"] == 2  # mid-leak left out
    assert "deleaked" not in raw and not (Path(raw["dir"]) / "recall_deltas_deleaked.csv").exists()


def test_exclude_without_an_audit_says_what_to_run(tmp_path, cfg_factory):
    from cleanloop.errors import CleanloopError

    manifest = _with_copies(tmp_path)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}", "audit.test_leaks=exclude")
    with pytest.raises(CleanloopError, match="run `cleanloop audit` first"):
        compare._leaked_test_rows(cfg)


def test_the_audit_key_follows_the_images(tmp_path, cfg_factory):
    manifest = _with_copies(tmp_path)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}")
    first = audit.run(cfg)
    assert audit.run(cfg)["reused"]
    arr = np.zeros((16, 16, 3), dtype=np.uint8)  # the twin is no longer a copy: same path, new bytes
    from PIL import Image

    Image.fromarray(arr).save(tmp_path / "img" / "dark-twin.png")
    again = audit.run(cfg)
    assert not again["reused"] and again["key"] != first["key"]
    pairs = pd.read_csv(Path(again["out_dir"]) / "duplicates.csv", dtype=str)
    assert not ((pairs["image_uuid_a"] == "dark-0") & (pairs["image_uuid_b"] == "dark-twin")).any()


def test_prefetched_search_is_taken_only_for_its_own_rows_and_settings(tmp_path, cfg_factory, monkeypatch):
    # cycle starts the duplicate search beside its imports (audit.prefetch); the step takes that
    # result for the same rows and settings only, and nothing is started for a finished entry.
    from cleanloop import audit as pure

    manifest = _with_copies(tmp_path)
    cfg = cfg_factory(*TINY, f"data.manifest={manifest}")
    assert audit.prefetch(cfg) is True
    assert len(audit._prefetched) == 1
    calls = []
    monkeypatch.setattr(pure, "find_duplicates", lambda *a, **k: calls.append(1) or pd.DataFrame())
    info = audit.run(cfg)
    assert calls == [] and audit._prefetched == {}  # the started search was taken, none run again
    pairs = pd.read_csv(Path(info["out_dir"]) / "duplicates.csv", dtype=str)
    assert {frozenset(p) for p in pairs[["image_uuid_a", "image_uuid_b"]].itertuples(index=False)} == {
        frozenset(("dark-0", "dark-twin")), frozenset(("mid-1", "mid-leak"))}
    assert audit.prefetch(cfg) is False  # finished entry: it will be reused, nothing to search

    # a search started for other settings is never taken by a step with these
    other = cfg_factory(*TINY, f"data.manifest={manifest}", "audit.phash_max_distance=4")
    third = cfg_factory(*TINY, f"data.manifest={manifest}", "audit.phash_max_distance=6")
    monkeypatch.undo()
    assert audit.prefetch(other) is True
    monkeypatch.setattr(pure, "find_duplicates", lambda *a, **k: calls.append(1) or pd.DataFrame(
        columns=list(pure.PAIR_COLUMNS)))
    audit.run(third)
    assert calls == [1] and len(audit._prefetched) == 1  # searched in the step; other's search untaken
    (untaken,) = audit._prefetched.values()
    audit.drop_prefetched()  # what `cleanloop cycle` does on its way out: the untaken search is stopped
    assert audit._prefetched == {} and not Path(f"/proc/{untaken.pid}").exists()


def _digit_copies(root: Path) -> Path:
    """Six 48-px digits (square, as the demo draws them) and copies of three: bytes (train, another
    group), 0.75x resized and JPEG q70 (test), 4% border cropped (val)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = root / "img"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(uuid, img, split, label, group, **save):
        img.convert("RGB").save(folder / f"{uuid}.{'jpg' if save else 'png'}", **save)
        rows.append({"image_uuid": uuid, "path": f"img/{uuid}.{'jpg' if save else 'png'}", "label": label,
                     "split": split, "group": group})

    originals = {}
    for n in range(6):
        img = Image.fromarray((digits.images[n] * 255 / 16).astype(np.uint8), mode="L").resize(
            (48, 48), Image.Resampling.BICUBIC)
        originals[n] = img
        add(f"d{n}", img, "train", str(digits.target[n]), f"g{n}")
    shutil.copy(folder / "d0.png", folder / "d0-copy.png")
    rows.append({"image_uuid": "d0-copy", "path": "img/d0-copy.png", "label": "0", "split": "train", "group": "gx"})
    add("d1-small", originals[1].resize((36, 36), Image.Resampling.BICUBIC), "test", "1", "gy")
    add("d2-q70", originals[2], "test", "2", "gz", quality=70)
    add("d3-crop", originals[3].crop((2, 2, 46, 46)), "val", "3", "gw")
    path = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_the_audit_hashes_from_the_image_cache_when_it_is_there(tmp_path, cfg_factory, monkeypatch):
    # acceptance 2 of issue 15: with the image cache built, the same pairs and no image file read
    from cleanloop import audit as pure
    from cleanloop.imagecache import cache_from_config, file_digest

    manifest = _digit_copies(tmp_path)
    sized = [f"data.manifest={manifest}", "model=tiny", f"model.image_size={pure.PIXELS_MIN_SIDE}",
             f"model.config.image_size={pure.PIXELS_MIN_SIDE}"]
    cfg = cfg_factory(*sized)
    decoded = audit.run(cfg)
    summary = json.loads((Path(decoded["out_dir"]) / "audit_summary.json").read_text())
    assert summary["pixels_from"].startswith("image files (no complete image cache")
    before = pd.read_csv(Path(decoded["out_dir"]) / "duplicates.csv", dtype=str, keep_default_na=False)
    linked = {frozenset(p) for p in before[["image_uuid_a", "image_uuid_b"]].itertuples(index=False)}
    assert linked == {frozenset(("d0", "d0-copy")), frozenset(("d1", "d1-small")), frozenset(("d2", "d2-q70")),
                      frozenset(("d3", "d3-crop"))}

    m_paths = [str(tmp_path / p) for p in pd.read_csv(manifest)["path"]]
    cache_from_config(cfg).ensure(m_paths)  # as `cleanloop cache` builds it

    def no_file(*args, **kwargs):
        raise AssertionError("an image file was read")

    monkeypatch.setattr(pure, "load_image", no_file)
    monkeypatch.setattr(pure, "content_hashes", no_file)
    again = audit.run(cfg_factory(*sized, "paths.reuse_steps=false"))
    assert again["key"] == decoded["key"]  # where the pixels came from is not part of the key
    summary = json.loads((Path(again["out_dir"]) / "audit_summary.json").read_text())
    assert summary["pixels_from"].startswith(f"image cache (raw, {pure.PIXELS_MIN_SIDE} px")
    after = pd.read_csv(Path(again["out_dir"]) / "duplicates.csv", dtype=str, keep_default_na=False)
    columns = ["image_uuid_a", "image_uuid_b", "kind", "split_a", "split_b"]
    pd.testing.assert_frame_equal(after[columns].sort_values(columns[:2], ignore_index=True),
                                  before[columns].sort_values(columns[:2], ignore_index=True))
    assert set(after.loc[after["kind"] == "exact", "method"]) == {"blake2b"}

    # a cache of smaller squares than the pixel check needs, or audit.image_cache=false: the files are decoded
    small = cfg_factory(f"data.manifest={manifest}", "model=tiny")
    cache_from_config(small).ensure(m_paths)
    digests = [file_digest(p) for p in m_paths]
    assert audit._cached_pixels(small, digests)[0] is None and cache_from_config(small).size < pure.PIXELS_MIN_SIDE
    assert audit._cached_pixels(cfg_factory(*sized, "audit.image_cache=false"), digests)[0] is None
    assert audit._cached_pixels(cfg, digests)[0] is not None
    # a prefetched search is taken only for the same pixels and sizes
    rows, args = audit._rows(audit.load_input(cfg)), audit._search_args(cfg)
    inputs, _ = audit._search_inputs(cfg, rows)
    assert inputs["pixels"] is not None and inputs["sizes"][rows.index[rows["image_uuid"] == "d1-small"][0]] == (36, 36)
    same = audit._search_id(rows, args, inputs)
    assert same == audit._search_id(rows, args, audit._search_inputs(cfg, rows)[0])
    assert same != audit._search_id(rows, args, {**inputs, "pixels": None, "sizes": None})
    assert same != audit._search_id(rows, args, {**inputs, "sizes": [(1, 2)] + inputs["sizes"][1:]})


def test_embedding_neighbours_inside_the_step(tmp_path, cfg_factory):
    # audit.embeddings: rows matched by image_uuid, pairs at cosine >= audit.min_cosine, its content in the key
    from cleanloop.errors import CleanloopError
    from cleanloop.oof_file import write_embeddings

    manifest = _with_copies(tmp_path)
    uuids = pd.read_csv(manifest, dtype=str)["image_uuid"].tolist()
    emb = np.eye(len(uuids), 32, dtype=np.float32)
    emb[uuids.index("bright-3")] = emb[uuids.index("dark-2")] + 0.05 * emb[uuids.index("bright-0")]  # cos 0.9988
    order = np.random.default_rng(0).permutation(len(uuids))  # rows in another order than the manifest's
    table = pd.DataFrame(emb[order], columns=[f"e{k}" for k in range(32)]).assign(
        image_uuid=[uuids[r] for r in order])
    table.to_parquet(tmp_path / "emb.parquet")

    base = [*TINY, f"data.manifest={manifest}"]
    plain = audit.run(cfg_factory(*base))
    with_emb = audit.run(cfg_factory(*base, f"audit.embeddings={tmp_path / 'emb.parquet'}", "audit.min_cosine=0.99"))
    assert with_emb["key"] != plain["key"]
    pairs = pd.read_csv(Path(with_emb["out_dir"]) / "duplicates.csv", dtype=str, keep_default_na=False)
    found = {(a, b): m for a, b, m in pairs[["image_uuid_a", "image_uuid_b", "method"]].itertuples(index=False)}
    assert found[("bright-3", "dark-2")] == "embedding" and len(found) == 3  # and the two byte copies
    assert with_emb["conflicting_label_clusters"] == 1  # bright-3 and dark-2: train rows, two labels

    # the pair `oof` writes (embeddings.npy + embedding_ids.parquet) gives the same pairs; a new file, a new key
    write_embeddings(tmp_path / "npy", emb[order] * 2.0, [uuids[r] for r in order])
    from_npy = audit.run(cfg_factory(*base, f"audit.embeddings={tmp_path / 'npy'}", "audit.min_cosine=0.99"))
    assert from_npy["key"] != with_emb["key"]
    again = pd.read_csv(Path(from_npy["out_dir"]) / "duplicates.csv", dtype=str, keep_default_na=False)
    assert set(zip(again["image_uuid_a"], again["image_uuid_b"], again["method"], strict=True)) == {
        (a, b, m) for (a, b), m in found.items()}

    # a prefetched search is taken only for the same embeddings, digests and min_cosine
    cfg = cfg_factory(*base, f"audit.embeddings={tmp_path / 'npy'}", "audit.min_cosine=0.99")
    rows, args = audit._rows(audit.load_input(cfg)), audit._search_args(cfg)
    inputs, _ = audit._search_inputs(cfg, rows)
    same = audit._search_id(rows, args, inputs)
    assert same == audit._search_id(rows, args, audit._search_inputs(cfg, rows)[0])
    for other in ({**inputs, "embeddings": None}, {**inputs, "embeddings": inputs["embeddings"] * 0.5},
                  {**inputs, "digests": inputs["digests"][::-1]}):
        assert audit._search_id(rows, args, other) != same
    assert audit._search_id(rows, {**args, "min_cosine": 0.9}, inputs) != same

    table[table["image_uuid"] != "mid-leak"].to_parquet(tmp_path / "short.parquet")
    with pytest.raises(CleanloopError, match=r"no row for 1 of the manifest's 26 rows \(mid-leak\)"):
        audit.run(cfg_factory(*base, f"audit.embeddings={tmp_path / 'short.parquet'}"))
    with pytest.raises(CleanloopError, match="nowhere.parquet not found"):
        audit.run(cfg_factory(*base, f"audit.embeddings={tmp_path / 'nowhere.parquet'}"))
