"""Every config group composes (lightning-hydra-template's tests/test_configs.py pattern)."""

from __future__ import annotations

import hydra
import pytest
from omegaconf import OmegaConf

from cleanloop.config import conf_dir

GROUPS = {
    "data": ["demo", "manifest"],
    "model": ["tiny", "medsiglip", "cnn"],
    "trainer": ["cpu", "gpu", "ddp"],
    "recipe": ["default"],
    "tracking": ["mlflow"],
    "paths": ["default"],
    "oof": ["embed", "insample", "kfold"],
    "flag": ["default"],
    "prune": ["default"],
    "compare": ["default"],
    "review": ["default"],
}


def test_every_group_option_has_a_file():
    for group, options in GROUPS.items():
        found = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        assert sorted(options) == found, group


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_group_option_composes(cfg_factory, group, option):
    extra = {"data": ["data.manifest=/x/m.csv"], "oof": ["oof.checkpoint=/x/model"]}
    overrides = [f"{group}={option}"] + (extra.get(group, []) if option in ("manifest", "insample") else [])
    cfg = cfg_factory(*overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg[group] is not None


def test_defaults(cfg_factory, tmp_path):
    cfg = cfg_factory()
    assert cfg.data.name == "demo" and cfg.model.name == "tiny-resnet" and cfg.trainer.accelerator == "cpu"
    assert cfg.get("experiment") is None
    assert cfg.paths.out_dir == f"{tmp_path}/outputs/demo"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert cfg.oof.n_folds == 5 and cfg.flag.filter_by == "prune_by_noise_rate"


def test_medsiglip_and_gpu_presets(cfg_factory):
    cfg = cfg_factory("model=medsiglip", "trainer=ddp")
    assert cfg.model.name_or_path == "google/medsiglip-448" and cfg.model.image_size == 448
    assert list(cfg.model.image_mean) == [0.5, 0.5, 0.5] == list(cfg.model.image_std)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy == "ddp_spawn"


def test_optimizer_is_a_partial(cfg_factory):
    import torch

    cfg = cfg_factory()
    opt = hydra.utils.instantiate(cfg.recipe.optimizer)(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == cfg.recipe.optimizer.weight_decay


@pytest.mark.parametrize("launcher", ["joblib", "slurm"])
def test_launchers_compose(launcher):
    from hydra import compose, initialize_config_dir

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher" if launcher == "slurm" else "hydra_plugins.hydra_joblib_launcher")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    if launcher == "slurm":
        assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    else:
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")


def test_experiment_preset_overrides_only_deltas(cfg_factory):
    cfg = cfg_factory("experiment=example")
    base = cfg_factory()
    assert cfg.recipe.epochs == 10 and cfg.flag.filter_by == "both"
    assert cfg.recipe.lr == base.recipe.lr


def test_every_yaml_key_is_commented():
    # STYLE: every key carries a comment saying why or where it is documented.
    bare = []
    for path in sorted(conf_dir().rglob("*.yaml")):
        if "hydra" in path.parts:
            continue
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("- ") or s.startswith("_"):
                continue
            above = lines[n - 2].strip() if n > 1 else ""
            if ":" in s and not s.endswith(":") and "#" not in s and not above.startswith("#"):
                bare.append(f"{path.relative_to(conf_dir())}:{n}: {s}")
    assert not bare, "keys without a comment:\n" + "\n".join(bare)
