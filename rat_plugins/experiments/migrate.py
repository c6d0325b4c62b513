"""Migrate the RAT experiment framework's YAML experiments into project configs.

A legacy file has sections ``model`` (``name``, ``multi_scale``, ``spatial_dims``, ``feature_dims``,
``num_blocks``, ``num_heads``, ``sga_attention_type`` / ``attention_type``, ...), ``training``
(``batch_size``, ``learning_rate``, ``grad_clip``, ``scheduler``, ...), ``deepspeed``, ``data``,
``checkpoints``, ``logging``, ``cluster``. Segmentation experiments become OpenMMLab configs that
inherit the project's RAT ISIC configs; detection experiments become detectron2 LazyConfigs on
the project's RAT COCO config. Each gets a run script, and a report lists every legacy key:
mapped (to which project key), handled otherwise (and how), or not mapped (and why): no key is
dropped silently.
"""

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..utils.config_keys import ConfigError
from . import REPO

__all__ = ["Migration", "migrate_file", "migrate_main", "ISIC_TRAIN_IMAGES"]

ISIC_TRAIN_IMAGES = 2594  # ISIC 2018 Task 1 training images: epochs -> iterations
COCO_TRAIN_IMAGES = 118287
SEG_BASES = {1: "rat_isic_single_256.py", 2: "rat_isic_dual_256-128.py", 3: "rat_isic_triple_256-128-64.py"}
SEG_SCALES = {1: (1.0,), 2: (1.0, 0.5), 3: (1.0, 0.5, 0.25)}
DET_BASE = "coco/rat_fpn_3level_coco.py"
ATTENTION = {"dense": "dense", "local": "local", "mha": "mha", "mixed": "mixed"}
# keys whose job the project does another way: (legacy key prefix, how)
HANDLED = {
    "description": "kept as the config's header comment",
    "experiment_name": "the config's file name and work dir",
    "name": "the config's file name and work dir",
    "debug": "no debug mode: run the config with --cfg-options train_cfg.max_iters=10 for a smoke run",
    "logging.log_dir": "logs go to the work dir; runs are tracked in MLflow (README, Tracking)",
    "logging.save_predictions": "tools/test.py CONFIG CHECKPOINT --out DIR writes the predictions",
    "checkpoints.save_dir": "checkpoints go to the work dir",
    "cluster.distributed_backend": "chosen by the tools: NCCL on GPUs, gloo on CPU",
    "data.data_dir": "datasets are found under $RAT_DATASETS (datasets/README.md): set it before running the script",
    "data.dataset": "given by the base config",
    "data.train_split": "given by the base config",
    "data.val_split": "given by the base config",
}


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


@dataclass
class Migration:
    """One converted experiment: the config's text, the run script's, and the report of every key."""

    source: Path
    name: str
    kind: str  # "segmentation" | "detection"
    config_text: str = ""
    script_text: str = ""
    mapped: List[Tuple[str, Any, str]] = field(default_factory=list)  # (legacy key, value, project key)
    handled: List[Tuple[str, Any, str]] = field(default_factory=list)  # (legacy key, value, how)
    unmapped: List[Tuple[str, Any, str]] = field(default_factory=list)  # (legacy key, value, why)

    def report(self) -> str:
        lines = [f"{self.source} -> {self.name} ({self.kind})"]
        for title, rows in (
            ("mapped", self.mapped),
            ("handled otherwise", self.handled),
            ("NOT MAPPED", self.unmapped),
        ):
            if rows:
                lines.append(f"  {title}:")
                lines += [f"    {k} = {json.dumps(v, default=str)}: {how}" for k, v, how in rows]
        return "\n".join(lines)


class _Converter:
    def __init__(self, flat: Dict[str, Any], migration: Migration):
        self.flat, self.m = flat, migration
        self.seen: set = set()

    def take(self, *keys, default=None):
        """The first of ``keys`` present (marked seen), else ``default``."""
        for key in keys:
            if key in self.flat:
                self.seen.add(key)
                return self.flat[key]
        return default

    def mapped(self, key, target, value=None):
        if key in self.flat:
            self.seen.add(key)
            self.m.mapped.append((key, self.flat[key] if value is None else value, target))

    def unmapped(self, key, why):
        if key in self.flat:
            self.seen.add(key)
            self.m.unmapped.append((key, self.flat[key], why))

    def finish(self):
        for key, value in self.flat.items():
            if key in self.seen:
                continue
            how = next((h for prefix, h in HANDLED.items() if key == prefix or key.startswith(prefix + ".")), None)
            if how is not None:
                self.m.handled.append((key, value, how))
            elif key.startswith("deepspeed."):
                why = (
                    "detectron2's trainer has no DeepSpeed path (DeepSpeed runs through tools/train.py)"
                    if self.m.kind == "detection"
                    else "no DeepSpeed setting of the project's tools (deepspeed.stage / offload_optimizer / "
                    "offload_param)"
                )
                self.m.unmapped.append((key, value, why))
            else:
                self.m.unmapped.append((key, value, "no project equivalent known"))


def _scales(c: _Converter) -> Tuple[float, ...]:
    scales = c.take("data.scales", "model.scales")
    multi = c.take("model.multi_scale", default=False)
    if scales:
        values = tuple(float(s) for s in scales)
        top = max(values)
        return tuple(sorted((s / top for s in values), reverse=True))
    return SEG_SCALES[3] if multi else SEG_SCALES[1]


def _attention(c: _Converter, target: str) -> Optional[str]:
    for key in ("model.sga_attention_type", "model.attention_type"):
        if key in c.flat:
            value = str(c.flat[key])
            if value == "dense" and c.m.kind == "segmentation":
                c.mapped(
                    key,
                    f"{target} (dense grouping at 256x256 holds a 16384 x 65536 matrix per head in the "
                    "first block, ~34 GB: the base's 'mixed' is what fits)",
                )
                return "dense"
            if value in ATTENTION:
                c.mapped(key, target)
                return ATTENTION[value]
            if value == "sparse":  # NATTEN, CUDA only: the windowed grouping is the project's local kind
                c.mapped(key, f"{target} ('local': the project's windowed grouping; 'sparse' needs NATTEN)")
                return "local"
            c.unmapped(key, f"attention {value!r} is not one of {sorted(ATTENTION)}")
    return None


def _deepspeed(c: _Converter, options: Dict[str, Any]) -> None:
    """``deepspeed.zero_stage`` / ``cpu_offload`` -> the config's ``deepspeed`` key (tools/train.py's ZeRO run)."""
    stage = c.flat.get("deepspeed.zero_stage")
    if stage is None:
        return
    if int(stage) not in (2, 3):
        c.unmapped("deepspeed.zero_stage", "the project's tools offer ZeRO-2 and ZeRO-3 (--deepspeed zero2|zero3)")
        return
    offload = bool(c.take("deepspeed.cpu_offload", default=False))
    options["deepspeed"] = dict(stage=f"zero{int(stage)}", offload_optimizer="cpu" if offload else None)
    c.mapped("deepspeed.zero_stage", f"deepspeed.stage = 'zero{int(stage)}' (tools/train.py trains with DeepSpeed)")
    c.mapped("deepspeed.cpu_offload", f"deepspeed.offload_optimizer = {'cpu' if offload else None!r}")


def _segmentation(c: _Converter, name: str) -> None:
    m = c.m
    scales = _scales(c)
    for key in ("data.scales", "model.scales", "model.multi_scale"):
        c.mapped(key, f"model.backbone.scales = {scales} (base {SEG_BASES.get(len(scales), '?')})")
    if len(scales) not in SEG_BASES:
        raise ConfigError(f"{m.source}: {len(scales)} scales; the project's RAT ISIC configs have 1, 2 or 3")
    spatial = c.take("model.spatial_dims", default=2)
    if int(spatial) != 2:
        raise ConfigError(f"{m.source}: model.spatial_dims {spatial}: the project's RAT configs are 2D")
    c.mapped("model.spatial_dims", "(2D, as the base)")
    c.take("model.name")
    c.m.handled.append(("model.name", c.flat.get("model.name"), "the RAT backbone of the base config"))
    backbone: Dict[str, Any] = {"scales": scales}
    for key, arg in (
        ("model.feature_dims", "feature_dims"),
        ("model.num_blocks", "num_blocks"),
        ("model.num_heads", "num_heads"),
        ("model.input_features", "input_features"),
        ("model.mlp_ratio", "mlp_ratio"),
        ("model.mlp_dropout", "mlp_dropout"),
        ("model.learnable_rose", "learnable_rose"),
        ("model.iters", "iters"),
    ):
        if key in c.flat:
            backbone[arg] = c.flat[key]
            c.mapped(key, f"model.backbone.{arg}")
    attention = _attention(c, "model.backbone.attention")
    if attention:
        backbone["attention"] = attention
    dims, blocks = int(backbone.get("feature_dims", 128)), int(backbone.get("num_blocks", 4))
    maps = len(scales) * blocks
    head = {"in_channels": [dims] * maps, "in_index": tuple(range(maps))}
    batch = c.take("training.effective_batch_size", "data.batch_size", "training.batch_size", default=8)
    for key in ("training.effective_batch_size", "data.batch_size", "training.batch_size"):
        c.mapped(
            key,
            f"train_dataloader.batch_size = {batch} (the effective batch; fit memory with "
            "--activation-checkpointing / --amp)",
        )
    for key in ("training.gradient_accumulation_steps", "training.accumulate_grad_batches"):
        c.mapped(key, "(the effective batch runs whole)")
    options: Dict[str, Any] = {"train_dataloader": {"batch_size": int(batch)}}
    optimizer: Dict[str, Any] = {}
    lr = c.take("training.learning_rate", "training.optimizer.lr")
    if lr is not None:
        optimizer["lr"] = float(lr)
        for key in ("training.learning_rate", "training.optimizer.lr"):
            c.mapped(key, "optim_wrapper.optimizer.lr")
    decay = c.take("training.weight_decay", "training.optimizer.weight_decay")
    if decay is not None:
        optimizer["weight_decay"] = float(decay)
        for key in ("training.weight_decay", "training.optimizer.weight_decay"):
            c.mapped(key, "optim_wrapper.optimizer.weight_decay")
    kind = str(c.take("training.optimizer.name", default="adamw")).lower()
    if kind != "adamw":
        c.unmapped(
            "training.optimizer.name", f"the base trains with AdamW; {kind} needs optim_wrapper.optimizer by hand"
        )
    else:
        c.mapped("training.optimizer.name", "optim_wrapper.optimizer.type (AdamW, as the base)")
    if "training.optimizer.betas" in c.flat:
        optimizer["betas"] = tuple(float(b) for b in c.flat["training.optimizer.betas"])
        c.mapped("training.optimizer.betas", "optim_wrapper.optimizer.betas")
    wrapper: Dict[str, Any] = {}
    if optimizer:
        wrapper["optimizer"] = optimizer
    clip = c.take("training.grad_clip", "training.gradient_clip")
    if clip:
        wrapper["clip_grad"] = dict(_delete_=True, max_norm=float(clip), norm_type=2)  # the base has None
        for key in ("training.grad_clip", "training.gradient_clip"):
            c.mapped(key, "optim_wrapper.clip_grad.max_norm")
    if wrapper:
        options["optim_wrapper"] = wrapper
    scheduler = c.take("training.scheduler", "training.scheduler.name")
    if scheduler is not None and str(scheduler) != "cosine":
        c.unmapped(
            "training.scheduler", f"the base anneals the LR by cosine; {scheduler!r} needs param_scheduler by hand"
        )
        c.unmapped(
            "training.scheduler.name", f"the base anneals the LR by cosine; {scheduler!r} needs param_scheduler by hand"
        )
    else:
        c.mapped("training.scheduler", "param_scheduler (cosine, as the base)")
    epochs = c.take("training.epochs", "training.num_epochs")
    per_epoch = math.ceil(ISIC_TRAIN_IMAGES / int(batch))
    if epochs is not None:
        iters = int(epochs) * per_epoch
        options["train_cfg"] = {"max_iters": iters}
        options["param_scheduler"] = [dict(type="CosineAnnealingLR", eta_min=1e-6, by_epoch=False, begin=0, end=iters)]
        for key in ("training.epochs", "training.num_epochs"):
            c.mapped(key, f"train_cfg.max_iters = {iters} ({epochs} epochs of {per_epoch} iterations at batch {batch})")
        every = c.take("training.eval_freq", "eval.eval_interval")
        if every:
            options["train_cfg"]["val_interval"] = int(every) * per_epoch
            for key in ("training.eval_freq", "eval.eval_interval"):
                c.mapped(key, f"train_cfg.val_interval = {int(every) * per_epoch}")
    seed = c.take("seed")
    if seed is not None:
        options["randomness"] = dict(seed=int(seed))
        c.mapped("seed", "randomness.seed")
    data = {
        k: c.flat[f"data.{k}"]
        for k in ("num_workers", "persistent_workers", "pin_memory", "prefetch_factor")
        if f"data.{k}" in c.flat
    }
    if data:
        options["train_dataloader"].update(data)
        for k in data:
            c.mapped(f"data.{k}", f"train_dataloader.{k}")
    size = c.take("data.image_size")
    if size is not None and int(size) != 256:
        c.unmapped("data.image_size", "the project's ISIC configs train at 256x256: set the pipelines' sizes by hand")
    elif size is not None:
        c.mapped("data.image_size", "(256, as the base)")
    hook: Dict[str, Any] = {}
    if "checkpoints.save_top_k" in c.flat:
        hook["max_keep_ckpts"] = int(c.flat["checkpoints.save_top_k"])
        c.mapped("checkpoints.save_top_k", "default_hooks.checkpoint.max_keep_ckpts")
    for key in ("checkpoints.monitor", "checkpoints.mode", "checkpoints.save_last"):
        c.mapped(key, "default_hooks.checkpoint (save_best='Dice', rule='greater', save_last: as the base)")
    if "logging.log_freq" in c.flat:
        options["default_hooks"] = {"logger": {"interval": int(c.flat["logging.log_freq"])}}
        c.mapped("logging.log_freq", "default_hooks.logger.interval")
    if hook:
        options.setdefault("default_hooks", {})["checkpoint"] = hook
    backend = c.take("logging.backend")
    if backend is not None:
        c.m.handled.append(
            ("logging.backend", backend, "MLflow tracking and mmengine's local scalars (README, Tracking)")
        )
    c.unmapped(
        "cluster.find_unused_parameters",
        "the project's RAT models use every parameter; for one that does not, set "
        "model_wrapper_cfg=dict(type='MMDistributedDataParallel', find_unused_parameters=True)",
    )
    gpus = int(c.take("cluster.num_gpus", default=1))
    c.mapped("cluster.num_gpus", f"the run script's process count ({gpus})")
    amp = bool(c.take("training.mixed_precision", default=False))
    c.mapped("training.mixed_precision", "the run script's --amp" if amp else "(full precision)")
    c.unmapped("training.save_freq", "checkpoints are saved by iteration: default_hooks.checkpoint.interval")
    c.unmapped("training.loss", "the base trains with cross-entropy: model.decode_head.loss_decode by hand")
    _deepspeed(c, options)
    c.finish()
    base = SEG_BASES[len(scales)]
    description = c.flat.get("description", "")
    options["model"] = {"backbone": backbone, "decode_head": head}
    body = "\n".join(f"{key} = {_py(value)}" for key, value in options.items())
    m.config_text = (
        f"# Migrated from {m.source.name}{': ' + str(description) if description else ''}\n"
        f"# (tools/migrate_experiments.py; the report lists every legacy key)\n"
        f"_base_ = [{_py(str(REPO / 'projects/RAT/configs' / base))}]\n{body}\n"
    )
    tool = (
        ["bash", "tools/dist_train.sh", "{config}", str(gpus)]
        if gpus > 1
        else ["${PYTHON:-.venv/bin/python}", "tools/train.py", "{config}"]
    )
    m.script_text = _script(tool + (["--amp"] if amp else []) + ["--work-dir", f"work_dirs/{name}", '"$@"'])


def _detection(c: _Converter, name: str) -> None:
    m = c.m
    lines = [f"cfg = LazyConfig.load({_py(str(REPO / 'projects/RAT/configs' / DET_BASE))})"]
    scales = _scales(c)
    for key in ("data.scales", "model.scales", "model.multi_scale"):
        c.mapped(key, f"model.backbone.bottom_up.scales = {scales}" if len(scales) == 3 else "(not mapped)")
    if len(scales) != 3:
        for key in ("data.scales", "model.scales", "model.multi_scale"):
            if key in c.flat:
                c.m.mapped = [row for row in c.m.mapped if row[0] != key]
                c.m.unmapped.append(
                    (key, c.flat[key], "the project's RAT COCO detector feeds FPN from a 3-level pyramid")
                )
    batch = c.take("training.effective_batch_size", "data.batch_size", "training.batch_size")
    if batch is not None:
        lines.append(f"cfg.dataloader.train.total_batch_size = {int(batch)}")
        for key in ("training.effective_batch_size", "data.batch_size", "training.batch_size"):
            c.mapped(
                key, "dataloader.train.total_batch_size (the effective batch; --micro-batch / --auto-batch fit it)"
            )
    for key in ("training.gradient_accumulation_steps", "training.accumulate_grad_batches"):
        c.mapped(key, "(the effective batch; accumulation by --micro-batch / --auto-batch)")
    lr = c.take("training.learning_rate", "training.optimizer.lr")
    if lr is not None:
        lines.append(f"cfg.optimizer.lr = {float(lr)!r}")
        for key in ("training.learning_rate", "training.optimizer.lr"):
            c.mapped(key, "optimizer.lr")
    decay = c.take("training.weight_decay", "training.optimizer.weight_decay")
    if decay is not None:
        lines.append(f"cfg.optimizer.weight_decay = {float(decay)!r}")
        for key in ("training.weight_decay", "training.optimizer.weight_decay"):
            c.mapped(key, "optimizer.weight_decay")
    if "training.optimizer.betas" in c.flat:
        lines.append(f"cfg.optimizer.betas = {_py(tuple(float(b) for b in c.flat['training.optimizer.betas']))}")
        c.mapped("training.optimizer.betas", "optimizer.betas")
    c.mapped("training.optimizer.name", "optimizer (AdamW, as the base)") if str(
        c.flat.get("training.optimizer.name", "adamw")
    ).lower() == "adamw" else c.unmapped("training.optimizer.name", "the base trains with AdamW")
    clip = c.take("training.grad_clip", "training.gradient_clip")
    if clip:
        lines.append(f"cfg.train.clip_grad_norm = {float(clip)!r}")
        for key in ("training.grad_clip", "training.gradient_clip"):
            c.mapped(key, "train.clip_grad_norm")
    if c.take("training.mixed_precision"):
        lines.append("cfg.train.amp.enabled = True")
        c.mapped("training.mixed_precision", "train.amp.enabled")
    seed = c.take("seed")
    if seed is not None:
        lines.append(f"cfg.train.seed = {int(seed)}")
        c.mapped("seed", "train.seed")
    epochs = c.take("training.epochs", "training.num_epochs")
    if epochs is not None:
        per_epoch = math.ceil(COCO_TRAIN_IMAGES / int(batch or 16))
        lines.append(f"cfg.train.max_iter = {int(epochs) * per_epoch}")
        for key in ("training.epochs", "training.num_epochs"):
            c.mapped(key, f"train.max_iter ({epochs} epochs of {per_epoch} iterations)")
    if "data.num_workers" in c.flat:
        lines.append(f"cfg.dataloader.train.num_workers = {int(c.flat['data.num_workers'])}")
        c.mapped("data.num_workers", "dataloader.train.num_workers")
    if "model.num_classes" in c.flat:
        classes = int(c.flat["model.num_classes"])
        if classes in (80, 91):  # 91: DETR's COCO id range; the 80 classes are the same
            c.mapped("model.num_classes", "model.roi_heads.num_classes (80 COCO classes)")
        else:
            c.unmapped("model.num_classes", "the base detects the 80 COCO classes")
    for key in list(c.flat):
        if key.startswith("model.") and key not in c.seen and key != "model.name":
            c.unmapped(key, "a setting of the legacy DETR-style detector; the project's is Faster R-CNN + FPN")
    c.take("model.name")
    c.m.handled.append(("model.name", c.flat.get("model.name"), "the RAT + FPN detector of the base config"))
    c.finish()
    gpus = int(c.flat.get("cluster.num_gpus", 1))
    exported = ["model", "dataloader", "optimizer", "lr_multiplier", "train"]
    m.config_text = (
        f"# Migrated from {m.source.name} (tools/migrate_experiments.py; the report lists every legacy key)\n"
        "from detectron2.config import LazyConfig\n\n"
        + "\n".join(lines)
        + "\n"
        + "\n".join(f"{k} = cfg.{k}" for k in exported)
        + "\ndel cfg\n"
    )
    tool = ["${PYTHON:-.venv/bin/python}", "tools/lazyconfig_train_net.py", "--config-file", "{config}"]
    if gpus > 1:
        tool += ["--num-gpus", str(gpus)]
    m.script_text = _script(tool + ['"$@"', f"train.output_dir=work_dirs/{name}"])


def _py(value) -> str:
    return repr(value)


def _script(argv: List[str]) -> str:
    command = " ".join(a if a.startswith(("$", '"')) or a == "{config}" else shlex.quote(a) for a in argv)
    return (
        "#!/bin/bash\n# Written by tools/migrate_experiments.py: runs the migrated config from the repository root.\n"
        f"set -euo pipefail\ncd {shlex.quote(str(REPO))}\n{command}\n"
    )


def migrate_file(path) -> Migration:
    """Convert one legacy YAML experiment (ConfigError for a file that is not one)."""
    import yaml

    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read it as YAML ({e})") from e
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConfigError(f"{path}: not a RAT experiment YAML (no 'model' section)")
    flat = _flatten(tree)
    name = str(tree.get("experiment_name") or tree.get("name") or path.stem)
    model_name = str(tree["model"].get("name", ""))
    detection = "detection" in model_name or "num_queries" in tree["model"] or "num_classes" in tree["model"]
    migration = Migration(path, name, "detection" if detection else "segmentation")
    converter = _Converter(flat, migration)
    (_detection if detection else _segmentation)(converter, name)
    return migration


def migrate_main(argv=None) -> int:
    """``tools/migrate_experiments.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Convert the RAT experiment framework's YAML experiments into project configs"
    )
    parser.add_argument("yaml", nargs="*", type=Path, help="legacy experiment files")
    parser.add_argument("--old-experiments-dir", type=Path, help="convert every *.yaml / *.yml under this folder")
    parser.add_argument("--out", type=Path, required=True, help="where the configs, run scripts and report go")
    args = parser.parse_args(argv)
    files = list(args.yaml)
    if args.old_experiments_dir:
        files += sorted(p for p in args.old_experiments_dir.rglob("*") if p.suffix in (".yaml", ".yml"))
    if not files:
        parser.error("give legacy YAML files or --old-experiments-dir")
    from ..utils.atomic import atomic_write_text

    reports, failed = [], 0
    args.out.mkdir(parents=True, exist_ok=True)
    for path in files:
        try:
            migration = migrate_file(path)
        except ConfigError as e:
            print(f"error: {e}")
            reports.append(f"{path}: not converted: {e}")
            failed += 1
            continue
        config = args.out / f"{migration.name}.py"
        script = args.out / f"run_{migration.name}.sh"
        atomic_write_text(config, migration.config_text)
        atomic_write_text(script, migration.script_text.replace("{config}", shlex.quote(str(config.resolve()))))
        script.chmod(0o755)
        reports.append(migration.report())
        print(migration.report())
        print(f"  written: {config}, {script}")
    atomic_write_text(args.out / "migration_report.txt", "\n\n".join(reports) + "\n")
    print(f"report: {args.out / 'migration_report.txt'}")
    return 2 if failed else 0
