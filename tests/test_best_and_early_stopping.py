"""The best-validation model, early stopping and dataset subsets, in both tool families.

detectron2: ``model_best.pth`` at the best validation mAP@0.5 (with ``model_best.json``), its test
metrics beside the final model's; ``train.early_stopping.patience``; ``train.dataset_fraction``.
OpenMMLab: ``early_stopping`` (mmengine's ``EarlyStoppingHook``) and ``dataset_fraction``.
"""

import json
import sys
from types import SimpleNamespace

import pytest

from rat_plugins.data.subset import fraction_count, fraction_indices
from rat_plugins.utils.config_keys import ConfigError

from _helpers import REPO, run_cmd


def test_fraction_indices_are_a_fixed_sorted_sample():
    assert fraction_indices(100, 0.1) == fraction_indices(100, 0.1)  # the same images in every run
    assert len(fraction_indices(100, 0.1)) == 10 and fraction_indices(100, 0.1) == sorted(fraction_indices(100, 0.1))
    assert fraction_indices(100, 0.1, seed=1) != fraction_indices(100, 0.1)
    assert fraction_indices(5, 1.0) == [0, 1, 2, 3, 4]
    assert fraction_count(8, 0.01) == 1 and fraction_count(8, 0.5) == 4 and fraction_count(7, 0.5) == 4
    for bad in (0, 1.5, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match="dataset_fraction must be a number in"):
            fraction_count(10, bad)


class _Storage:
    def __init__(self, values):
        self.values = values

    def latest(self):
        return self.values


def test_the_best_record_and_the_early_stopping_scores_survive_a_restart(tmp_path):
    """A resumed run starts from model_best.json's score and counts only the evaluations before its start."""
    import torch

    from rat_plugins.detectron2.hooks import BestModelCheckpointer, EarlyStopping, TrainingEndedEarly

    saved = []

    def save(name, **kw):
        saved.append((name, kw))
        torch.save({"model": {}, **kw}, tmp_path / f"{name}.pth")

    checkpointer = SimpleNamespace(save_dir=str(tmp_path), save=save)
    trainer = SimpleNamespace(iter=3, start_iter=0, max_iter=40, storage=_Storage({"bbox/AP50": (20.0, 3)}))
    best = BestModelCheckpointer(4, checkpointer, "bbox/AP50", iters_per_epoch=4)
    best.trainer = trainer
    best.before_train()
    best.after_step()
    assert saved == [("model_best", {"iteration": 3})]
    record = json.loads((tmp_path / "model_best.json").read_text())
    assert record == dict(metric="bbox/AP50", value=20.0, iteration=3, epoch=1.0)
    # a restart: a worse first evaluation leaves the better model in place
    again = BestModelCheckpointer(4, checkpointer, "bbox/AP50", iters_per_epoch=4)
    again.trainer = SimpleNamespace(iter=7, start_iter=4, max_iter=40, storage=_Storage({"bbox/AP50": (10.0, 7)}))
    again.before_train()
    again.after_step()
    assert again.best_metric == 20.0 and len(saved) == 1
    # a run that starts again from iteration 0 (no intact checkpoint) or whose best model is damaged
    # has no best yet: its first evaluation saves
    for start, damage in ((0, False), (4, True)):
        if damage:
            (tmp_path / "model_best.pth").write_bytes(b"not a checkpoint")
        fresh = BestModelCheckpointer(4, checkpointer, "bbox/AP50", iters_per_epoch=4)
        fresh.trainer = SimpleNamespace(
            iter=7, start_iter=start, max_iter=40, storage=_Storage({"bbox/AP50": (5.0, 7)})
        )
        fresh.before_train()
        assert fresh.best_metric is None
        fresh.after_step()
        assert saved[-1] == ("model_best", {"iteration": 7})

    stop = EarlyStopping(4, "bbox/AP50", patience=2, output_dir=str(tmp_path))
    stop.trainer = SimpleNamespace(iter=3, start_iter=0, max_iter=40, storage=None)
    stop.before_train()
    for iteration, value in ((3, 20.0), (7, 15.0)):
        stop.trainer.iter, stop.trainer.storage = iteration, _Storage({"bbox/AP50": (value, iteration)})
        stop.after_step()
    # restarted at iteration 8 (its checkpoint was iteration 7): the two scores count, a third stale one stops
    restarted = EarlyStopping(4, "bbox/AP50", patience=2, output_dir=str(tmp_path))
    restarted.trainer = SimpleNamespace(iter=7, start_iter=8, max_iter=40, storage=None)
    restarted.before_train()
    assert restarted.scores == [(3, 20.0), (7, 15.0)]
    restarted.trainer.iter, restarted.trainer.storage = 11, _Storage({"bbox/AP50": (19.0, 11)})
    with pytest.raises(TrainingEndedEarly, match=r"has not improved on 20 \(iteration 3\) for 2 evaluations"):
        restarted.after_step()
    # restarted at iteration 4 instead: the evaluation at 7 is repeated, not counted twice
    earlier = EarlyStopping(4, "bbox/AP50", patience=2, output_dir=str(tmp_path))
    earlier.trainer = SimpleNamespace(iter=3, start_iter=4, max_iter=40, storage=None)
    earlier.before_train()
    assert earlier.scores == [(3, 20.0)]
    with pytest.raises(ConfigError, match="patience must be a whole number >= 1"):
        EarlyStopping(4, "bbox/AP50", patience=0, output_dir=str(tmp_path))


@pytest.mark.slow
def test_detectron2_best_model_early_stopping_and_a_subset(heads_data, tmp_path):
    """Half the 8 training images (2 iterations an epoch at batch 2), 4 epochs, an impossible min_delta:
    evaluations after iterations 1, 3 and 5, then the run ends early with its best model tested."""
    from bad_inputs.test_bad_detectron2_runs import _env, tool

    out = tmp_path / "run"
    overrides = ["train.epochs=4", "train.dataset_fraction=0.5"]
    overrides += ["train.early_stopping.patience=2", "train.early_stopping.min_delta=1000"]
    proc = run_cmd(tool(out, *overrides), env=_env(heads_data))
    log = (out / "log.txt").read_text()
    # 8 images, one without boxes left out of training by detectron2: 4 of the 7 (the schedule counts 4 of 8)
    assert "dataset_fraction=0.5: training on 4 of 7 images (seed 0)" in log
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["max_iter"] == 8, "the epochs are epochs of the subset"
    assert final["ended_early"]["iteration"] == 5 and final["ended_early"]["metric"] == "bbox/AP50"
    assert "Early stopping after iteration 5" in log
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text() != "model_best.pth", "a resume never starts from the best model"
    record = json.loads((out / "model_best.json").read_text())
    scores = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    scores = [(m["iteration"], m["bbox/AP50"]) for m in scores if "bbox/AP50" in m]
    assert [i for i, _ in scores] == [1, 3, 5]
    best_iteration, best_value = max(scores, key=lambda s: s[1])  # the first of equal scores
    assert (record["iteration"], record["value"]) == (best_iteration, best_value)
    assert record["epoch"] == (best_iteration + 1) / 2
    assert final["best"]["iteration"] == best_iteration and "AP50" in final["best"]["test"]["bbox"]
    assert "AP50" in final["test"]["bbox"], proc.stdout[-2000:]
    # the summary table reads both
    from rat_plugins.experiments.ofat import summarize_run

    row = summarize_run("run", out)
    assert row["best_model_mAP@0.5"] == f"{final['best']['test']['bbox']['AP50']:.1f}"
    assert row["best_val_mAP@0.5"] == f"{best_value:.1f}"


def test_openmmlab_early_stopping_hook_from_the_config_key():
    from mmengine.config import Config

    from rat_plugins.mm.runner import early_stopping_hook

    cfg = Config.fromfile(str(REPO / "projects/SETR/configs/setr_vit-s16_mla_fundus.py"))
    assert early_stopping_hook(cfg) is None  # off by default
    cfg.merge_from_dict({"early_stopping": dict(patience=3)})
    hook = early_stopping_hook(cfg)
    assert hook == dict(type="EarlyStoppingHook", monitor="Dice", patience=3, rule="greater", min_delta=0.0)
    cfg.val_evaluator = dict(type="SomeOtherMetric")
    with pytest.raises(ConfigError, match="name the validation metric to watch with early_stopping.monitor"):
        early_stopping_hook(cfg)


@pytest.mark.slow
def test_openmmlab_early_stopping_and_a_subset_through_tools_train(fundus_data, tmp_path):
    from test_setr import CONFIG_DIR, cfg_options

    work = tmp_path / "setr"
    options = cfg_options(
        train_cfg__max_iters=8,
        train_cfg__val_interval=2,
        param_scheduler__0__end=8,
        dataset_fraction=0.5,
        early_stopping__patience=1,
        early_stopping__min_delta=1000,
    )
    args = [
        sys.executable,
        "tools/train.py",
        str(CONFIG_DIR / "setr_vit-s16_mla_fundus.py"),
        "--work-dir",
        str(work),
        *options,
    ]
    proc = run_cmd(args, env={"RAT_DATASETS": str(fundus_data)})
    text = proc.stdout + proc.stderr
    assert "dataset_fraction=0.5: training on" in text
    final = json.loads((work / "final_metrics.json").read_text())
    assert final["iter"] == 4, "stopped after the second validation (no improvement by 1000)"
