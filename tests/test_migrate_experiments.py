"""tools/migrate_experiments.py: legacy RAT experiment YAML (the framework's own layouts) into project configs."""

import json
import sys

import pytest

from _helpers import run_cmd

SINGLE = """\
description: Single-scale RAT for skin lesion segmentation
experiment_name: rat_single_isic2018
seed: 42
model:
  name: rat
  multi_scale: false
  spatial_dims: 2
  input_features: 3
  feature_dims: 64
  num_blocks: 2
  num_heads: 4
  attention_type: dense
  learnable_rose: true
  mlp_ratio: 4
training:
  batch_size: 2
  effective_batch_size: 4
  gradient_accumulation_steps: 2
  epochs: 3
  eval_freq: 1
  learning_rate: 0.0002
  weight_decay: 0.01
  grad_clip: 1.0
  scheduler: cosine
  mixed_precision: false
  save_freq: 5
data:
  data_dir: /old/cluster/isic
  image_size: 256
  num_workers: 0
logging:
  backend: tensorboard
  log_dir: /old/cluster/logs
  log_freq: 1
checkpoints:
  monitor: val_dice_score
  mode: max
  save_top_k: 2
cluster:
  num_gpus: 1
  find_unused_parameters: true
"""

MULTI = """\
experiment_name: rat_multiscale_isic2018
model:
  name: rat
  multi_scale: true
  feature_dims: 32
  num_blocks: 1
  num_heads: 2
  sga_attention_type: sparse
data:
  scales: [256, 128, 64]
training:
  batch_size: 4
  learning_rate: 1e-4
deepspeed:
  zero_stage: 2
  cpu_offload: true
"""

DETECTION = """\
name: rat_detection_single_scale
seed: 7
model:
  name: rat_detection
  multi_scale: true
  num_classes: 91
  num_queries: 100
  hidden_dim: 256
training:
  effective_batch_size: 16
  batch_size: 2
  num_epochs: 2
  gradient_clip: 0.1
  mixed_precision: true
  optimizer:
    name: adamw
    lr: 1e-4
    weight_decay: 1e-4
    betas: [0.9, 0.999]
data:
  dataset: coco
  num_workers: 4
"""


@pytest.fixture()
def legacy(tmp_path):
    folder = tmp_path / "old_experiments"
    (folder / "seg").mkdir(parents=True)
    (folder / "seg" / "rat_single.yaml").write_text(SINGLE)
    (folder / "seg" / "rat_multiscale.yaml").write_text(MULTI)
    (folder / "detection.yml").write_text(DETECTION)
    return folder


def _migrate(legacy, out):
    args = [sys.executable, "tools/migrate_experiments.py", "--old-experiments-dir", str(legacy), "--out", str(out)]
    return run_cmd(args)


def test_every_legacy_key_is_reported_and_the_configs_load(legacy, tmp_path):
    from detectron2.config import LazyConfig
    from mmengine.config import Config

    out = tmp_path / "migrated"
    _migrate(legacy, out)
    report = (out / "migration_report.txt").read_text()
    # each legacy key appears in the report, under one of the three headings
    for text in (SINGLE, MULTI, DETECTION):
        import yaml

        def leaves(tree, prefix=""):
            for k, v in tree.items():
                name = f"{prefix}.{k}" if prefix else k
                yield from leaves(v, name) if isinstance(v, dict) else [name]

        for key in leaves(yaml.safe_load(text)):
            assert f"    {key} = " in report, key
    assert "deepspeed.zero_stage = 2: deepspeed.stage = 'zero2'" in report
    assert "deepspeed.cpu_offload = true: deepspeed.offload_optimizer = 'cpu'" in report
    assert "model.num_queries = 100: a setting of the legacy DETR-style detector" in report
    assert "cluster.find_unused_parameters = true: the project's RAT models use every parameter" in report
    assert 'model.attention_type = "dense": model.backbone.attention (dense grouping at 256x256' in report

    single = Config.fromfile(out / "rat_single_isic2018.py")
    assert single.model.backbone.feature_dims == 64 and single.model.backbone.scales == (1.0,)
    assert single.model.decode_head.in_channels == [64] * 2 and single.model.backbone.attention == "dense"
    assert single.train_dataloader.batch_size == 4 and single.optim_wrapper.clip_grad.max_norm == 1.0
    assert single.train_cfg.max_iters == 3 * 649 and single.randomness.seed == 42  # 2594 images / 4
    multi = Config.fromfile(out / "rat_multiscale_isic2018.py")
    assert multi.model.backbone.scales == (1.0, 0.5, 0.25) and multi.model.backbone.attention == "local"
    assert multi.model.decode_head.in_index == (0, 1, 2)
    assert multi.deepspeed == dict(stage="zero2", offload_optimizer="cpu")
    detection = LazyConfig.load(str(out / "rat_detection_single_scale.py"))
    assert detection.dataloader.train.total_batch_size == 16 and detection.optimizer.lr == 1e-4
    assert detection.train.clip_grad_norm == 0.1 and detection.train.amp.enabled and detection.train.seed == 7
    assert detection.model.backbone.bottom_up.scales == (1.0, 0.5, 0.25)
    script = (out / "run_rat_single_isic2018.sh").read_text()
    assert "tools/train.py" in script and str(out / "rat_single_isic2018.py") in script


def test_a_file_that_is_not_an_experiment_is_refused(tmp_path):
    bad = tmp_path / "notes.yaml"
    bad.write_text("just: text\n")
    proc = run_cmd(
        [sys.executable, "tools/migrate_experiments.py", str(bad), "--out", str(tmp_path / "o")], check=False
    )
    assert proc.returncode == 2 and f"error: {bad}: not a RAT experiment YAML (no 'model' section)" in proc.stdout


@pytest.mark.slow
def test_migrated_segmentation_configs_train_two_iterations(legacy, isic_data, deepspeed_env, tmp_path):
    """The single-scale config trains with the Runner; the multi-scale one, whose legacy YAML asked for
    ZeRO-2 with CPU offload, through DeepSpeed."""
    out = tmp_path / "migrated"
    _migrate(legacy, out)
    for name in ("rat_single_isic2018", "rat_multiscale_isic2018"):
        work = tmp_path / "work" / name
        args = [sys.executable, "tools/train.py", str(out / f"{name}.py"), "--work-dir", str(work), "--cfg-options"]
        args += ["train_cfg.max_iters=2", "train_cfg.val_interval=2", "param_scheduler.0.end=2"]
        args += [
            "train_dataloader.batch_size=2",
            "train_dataloader.num_workers=0",
            "train_dataloader.persistent_workers=False",
        ]
        args += ["val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False"]
        args += ["default_hooks.checkpoint.interval=2", "test_dataloader.num_workers=0"]
        # the sizes of tests/test_rat_isic.py: 64x64 images, a narrow head
        args += ["model.data_preprocessor.size=(64,64)", "train_dataloader.dataset.pipeline.2.scale=(64,64)"]
        args += ["val_dataloader.dataset.pipeline.1.scale=(64,64)", "test_dataloader.dataset.pipeline.1.scale=(64,64)"]
        args += ["model.decode_head.channels=16", "model.decode_head.pool_scales=(1,2)", "model.backbone.iters=1"]
        if name == "rat_single_isic2018":  # its legacy dense grouping needs ~34 GB at 256x256 (the report says so)
            args += ["model.backbone.attention=mixed"]
        env = {"RAT_DATASETS": str(isic_data), **(deepspeed_env if name == "rat_multiscale_isic2018" else {})}
        run_cmd(args, env=env)
        assert (work / "final_metrics.json").is_file(), name
    assert json.loads((tmp_path / "work" / "rat_multiscale_isic2018" / "deepspeed_config.json").read_text())[
        "zero_optimization"
    ] == dict(
        stage=2, contiguous_gradients=True, overlap_comm=False, offload_optimizer=dict(device="cpu", pin_memory=False)
    )


@pytest.mark.slow
def test_migrated_detection_config_trains_two_iterations(legacy, tmp_path):
    from rat_plugins.data.synthetic import make_coco

    root = tmp_path / "datasets"
    make_coco(root / "coco2017", n=4, seed=0, size=192)
    out = tmp_path / "migrated"
    _migrate(legacy, out)
    from test_rat_coco import TINY as COCO_TINY

    config = out / "rat_detection_single_scale.py"
    args = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", str(config), *COCO_TINY]
    args += ["train.amp.enabled=False", "train.eval_period=1000", f"train.output_dir={tmp_path / 'det'}"]
    run_cmd(args, env={"RAT_DATASETS": str(root)})
    assert (tmp_path / "det" / "model_final.pth").is_file()
