"""The SigLIP classifier: the tiny model goes through the same from_pretrained path as MedSigLIP."""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from cleanloop.data import ImageTransform, augment_batch
from cleanloop.errors import CleanloopError
from cleanloop.images import load_image, pad_to_square
from cleanloop.manifest import load_manifest
from cleanloop.model import Classifier, backbone_from_config, load_backbone
from cleanloop.training import fit_predict

from conftest import run_cli

TINY = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2)


def test_saved_tiny_siglip_loads_and_trains_one_step(tmp_path, tiny_manifest):
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY)).save_pretrained(tmp_path / "siglip")
    backbone = load_backbone(tmp_path / "siglip")  # the function that loads google/medsiglip-448
    assert backbone.config.hidden_size == 32
    m = load_manifest(tiny_manifest)
    tf = ImageTransform(16)
    x = torch.stack([tf(load_image(p)) for p in m.train["abs_path"][:6]])
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 16, 16)
    y = torch.tensor(m.label_indices(m.train)[:6])
    model = Classifier(backbone, m.classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.loss(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_fit_predict_returns_probs_keyed_by_uuid(cfg_factory, tiny_manifest, head, tmp_path):
    cfg = cfg_factory("recipe.epochs=1", "recipe.batch_size=8", f"recipe.head={head}",
                      "model=tiny", "model.image_size=16", "model.config.image_size=16")
    m = load_manifest(tiny_manifest)
    test = m.split("test")
    model, preds = fit_predict(cfg, m.classes, m.train, predict_frames={"test": test})
    uuids, probs, emb = preds["test"]
    assert emb.shape == (len(test), cfg.model.config.hidden_size)
    assert uuids == test["image_uuid"].tolist() and probs.shape == (len(test), 3)
    assert (probs >= 0).all() and (probs <= 1).all()
    if head == "softmax":
        assert abs(probs.sum(1) - 1).max() < 1e-5
    # save / load round trip (safetensors, no pickle) predicts the same
    model.save(tmp_path / "model")
    again = Classifier.load(tmp_path / "model").eval()
    x = torch.stack([ImageTransform(16)(load_image(p)) for p in test["abs_path"]])
    with torch.no_grad():
        assert torch.allclose(again.probs(again(x)), model.probs(model(x)), atol=1e-6)


def test_medsiglip_without_network_is_one_clear_line(cfg_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_factory("model=medsiglip")
    with pytest.raises(CleanloopError) as e:
        backbone_from_config(cfg.model, cache_dir=cfg.paths.cache_dir, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "google/medsiglip-448" in msg
    assert "huggingface-cli login" in msg and "model.name_or_path=/path/to/local/folder" in msg


def test_medsiglip_cli_exits_with_the_line_not_a_traceback(tmp_path, tiny_manifest):
    r = run_cli("train", "data=manifest", f"data.manifest={tiny_manifest}", "model=medsiglip",
                f"paths.root_dir={tmp_path}", "data.num_workers=0", cwd=tmp_path)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("cleanloop train: error: model.name_or_path=google/medsiglip-448")
    assert "Traceback" not in r.stderr


def test_unknown_step_exits_2(tmp_path):
    assert run_cli("nonsense", cwd=tmp_path).returncode == 2


def test_augment_batch_keeps_shape_and_is_seeded():
    x = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    a = augment_batch(x, max_rotation=10, crop_scale=0.8, hflip=True, generator=torch.Generator().manual_seed(0))
    b = augment_batch(x, max_rotation=10, crop_scale=0.8, hflip=True, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    identity = augment_batch(x)  # no augmentation requested: the image comes back unchanged
    assert torch.allclose(identity, x.float(), atol=1e-3)


def test_pad_to_square_keeps_content(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (20, 10), (255, 0, 0))
    sq = pad_to_square(img)
    assert sq.size == (20, 20) and sq.getpixel((10, 10)) == (255, 0, 0) and sq.getpixel((0, 0)) == (0, 0, 0)


def test_image_modes_are_converted(tmp_path):
    from PIL import Image

    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        path = tmp_path / f"{mode.replace(';', '')}.{'tif' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (8, 6)).save(path)
        assert load_image(str(path)).mode == "RGB"
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(CleanloopError, match="cannot decode image"):
        load_image(str(tmp_path / "text.jpg"))


def test_fused_adamw_is_asked_for_only_when_the_recipe_leaves_it_open():
    import functools

    from cleanloop.model import _takes

    assert _takes(functools.partial(torch.optim.AdamW, weight_decay=0.05), "fused")
    assert not _takes(functools.partial(torch.optim.AdamW, fused=False), "fused")  # the recipe's choice stands
    assert not _takes(torch.optim.LBFGS, "fused")  # no fused kernel
    assert not _takes(functools.partial(torch.optim.AdamW, foreach=False), "foreach")


def test_cpu_training_uses_the_multi_tensor_optimizer_unless_the_recipe_says_otherwise(cfg_factory):
    from cleanloop.training import build_module

    module = build_module(cfg_factory("model=cnn", "recipe.scheduler=null"), ["a", "b"])
    assert module.configure_optimizers().defaults["foreach"] is True
    module = build_module(cfg_factory("model=cnn", "recipe.scheduler=null", "+recipe.optimizer.foreach=false"),
                          ["a", "b"])
    assert module.configure_optimizers().defaults["foreach"] is False
