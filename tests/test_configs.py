"""Every config under projects/ builds on CPU: detectron2 LazyConfigs through ``instantiate``,
OpenMMLab configs through the mmseg / mmdet registries; loading a config registers and writes nothing."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

PROJECTS = Path(__file__).resolve().parents[1] / "projects"
ALL = sorted(PROJECTS.rglob("*.py"))
LAZY = [p for p in ALL if re.search(r"^(from|import) [\w.]*detectron2", p.read_text(), re.M)]
MM = [p for p in ALL if p not in LAZY]
SCOPES = {"RAT": "mmseg", "SETR": "mmseg", "YOLOX": "mmdet", "RVT": "mmdet"}
# small widths where a full-size build costs seconds: ViM-tiny's 24 layers, RAT's 128 channels
LAZY_TINY = {
    "model.backbone.net": dict(depth=2, embed_dim=32, checkpoint=""),
    "model.backbone.bottom_up": dict(feature_dims=16, num_heads=2, iters=1),
}


def _rel(path):
    return str(path.relative_to(PROJECTS))


def _make_datasets(root):
    """Tiny head-detection and COCO 2017 sets for the configs' loaders."""
    from rat_plugins.data.synthetic import make_coco, make_heads

    make_heads(root / "coco", n=4, seed=0, size=64)
    make_coco(root / "coco2017", n=3, seed=0, size=192)
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return _make_datasets(tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def clean_catalog():
    """Registrations made by a test are removed afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    before = set(DatasetCatalog.list())
    yield before
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _node(cfg, dotted):
    for part in dotted.split("."):
        if part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _build_lazy(path, tmp_path):
    from detectron2.config import LazyConfig, instantiate
    from omegaconf import OmegaConf

    import rat_plugins.detectron2  # noqa: F401
    from rat_plugins.detectron2.schedule import set_epoch_schedule

    cfg = LazyConfig.load(str(path))
    assert cfg, f"{_rel(path)} defines nothing"
    built = {}
    if "model" in cfg:
        for dotted, values in LAZY_TINY.items():
            node = _node(cfg, dotted)
            if node is not None:
                node.update({k: v for k, v in values.items() if k in node})
        built["model"] = instantiate(cfg.model)
        assert sum(p.numel() for p in built["model"].parameters()) > 0
    params_of = built.get("model", nn.Linear(4, 4))
    for key in cfg:
        node = cfg[key]
        target = node.get("_target_") if hasattr(node, "get") else None
        if isinstance(target, type) and issubclass(target, torch.optim.Optimizer):
            node.params.model = params_of
            built[key] = instantiate(node)
    if "lr_multiplier" in cfg:
        if cfg.lr_multiplier.scheduler.get("num_updates") == 1:  # common/train.py: the experiment fills it
            batch = OmegaConf.create(dict(train=dict(total_batch_size=2)))
            set_epoch_schedule(cfg.train, cfg.lr_multiplier, batch, epochs=1, num_images=10)
        built["lr_multiplier"] = instantiate(cfg.lr_multiplier)
        assert 0 < built["lr_multiplier"](0.5) <= 1
    if "dataloader" in cfg:
        loaders = [k for k in cfg.dataloader if hasattr(cfg.dataloader[k], "get") and "dataset" in cfg.dataloader[k]]
        for key in loaders:  # first: the datasets register when their loader is built
            cfg.dataloader[key].num_workers = 0
            built[key] = instantiate(cfg.dataloader[key])
        for key in [k for k in cfg.dataloader if k.endswith("evaluator")]:
            cfg.dataloader[key].output_dir = str(tmp_path / key)
            built[key] = instantiate(cfg.dataloader[key])
        assert "train" in loaders
    return built


def _registries(scope):
    if scope == "mmseg":
        from mmseg import registry
    else:
        from mmdet import registry
    return registry


def _build_mm(path):
    """Build the model, optimizer and schedulers; datasets, transforms, metrics, hooks, loops and
    visualizers (whose data or files are not here) must resolve in the registries."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    import rat_plugins.mm  # noqa: F401

    rel = path.relative_to(PROJECTS)
    scope = SCOPES.get(rel.parts[0]) or rel.stem.split("_")[0]
    cfg = Config.fromfile(str(path))
    assert cfg.get("default_scope", scope) == scope
    init_default_scope(scope)
    reg = _registries(scope)
    built = {}
    if "model" in cfg and "type" not in cfg.model:  # a base holding parts of a model: build those
        for key, part in cfg.model.items():
            built[f"model.{key}"] = reg.MODELS.build(part)
    elif "model" in cfg:
        backbone = cfg.model.get("backbone", {})
        if "checkpoint" in backbone:
            backbone.checkpoint = None
        if "feature_dims" in backbone:  # RAT: 16 channels per map instead of 128 (its init is slow)
            backbone.update(feature_dims=16, num_heads=2)
            cfg.model.decode_head.update(in_channels=[16] * len(cfg.model.decode_head.in_channels), channels=16)
        built["model"] = reg.MODELS.build(cfg.model)
        assert sum(p.numel() for p in built["model"].parameters()) > 0
    if "optim_wrapper" in cfg:
        built["optim_wrapper"] = build_optim_wrapper(built.get("model", nn.Linear(4, 4)), cfg.optim_wrapper)
        for i, sched in enumerate(cfg.get("param_scheduler", [])):
            built[f"param_scheduler.{i}"] = reg.PARAM_SCHEDULERS.build(dict(sched, optimizer=built["optim_wrapper"]))
    named = []  # (registry, key, type)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if key in cfg:
            dataset = cfg[key].dataset
            named += [(reg.DATASETS, key, dataset.type)]
            named += [(reg.TRANSFORMS, key, step.type) for step in dataset.get("pipeline", [])]
    named += [(reg.METRICS, key, cfg[key].type) for key in ("val_evaluator", "test_evaluator") if key in cfg]
    named += [(reg.HOOKS, f"default_hooks.{k}", h.type) for k, h in cfg.get("default_hooks", {}).items()]
    named += [
        (reg.LOOPS, key, cfg[key].type) for key in ("train_cfg", "val_cfg", "test_cfg") if "type" in cfg.get(key, {})
    ]
    if "visualizer" in cfg:
        named += [(reg.VISUALIZERS, "visualizer", cfg.visualizer.type)]
        named += [(reg.VISBACKENDS, "vis_backends", b.type) for b in cfg.visualizer.get("vis_backends", [])]
    for registry, key, name in named:
        assert registry.get(name) is not None, f"{_rel(path)}: {key} names {name!r}, not in {registry.name}"
    return dict(built, **{f"{key}:{name}": name for _, key, name in named})


def test_configs_are_found():
    assert {p.relative_to(PROJECTS).parts[0] for p in LAZY} == {"ViTDet", "RAT"}
    assert {p.relative_to(PROJECTS).parts[0] for p in MM} == {"RAT", "SETR", "YOLOX", "RVT", "_base_"}


@pytest.mark.parametrize("path", ALL, ids=_rel)
def test_config_builds(path, datasets, tmp_path, monkeypatch, clean_catalog):
    monkeypatch.setenv("RAT_DATASETS", str(datasets))
    built = _build_lazy(path, tmp_path) if path in LAZY else _build_mm(path)
    assert built, f"{_rel(path)}: nothing in it was built"


def test_loading_configs_registers_and_writes_nothing(tmp_path, monkeypatch, clean_catalog):
    from detectron2.config import LazyConfig
    from detectron2.data import DatasetCatalog
    from mmengine.config import Config

    datasets = _make_datasets(tmp_path)
    monkeypatch.setenv("RAT_DATASETS", str(datasets))
    files = sorted(datasets.rglob("*"))
    assert not list(datasets.rglob("_annotations.coco_filtered.json"))
    for path in LAZY:
        LazyConfig.load(str(path))
    for path in MM:
        Config.fromfile(str(path))
    assert set(DatasetCatalog.list()) == clean_catalog
    assert sorted(datasets.rglob("*")) == files


@pytest.mark.parametrize("path", ALL, ids=_rel)
def test_configs_only_compose(path):
    """No device choice and no helper functions in a config: the tools decide, the library helps."""
    text = path.read_text()
    assert "cuda.is_available" not in text
    assert not re.search(r"^\s*(def|class)\s|\blambda\b", text, re.M)
    assert "register_" not in text
