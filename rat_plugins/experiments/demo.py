"""``make demo``: sample head data, the OFAT baseline in quick mode, then the results table.

Writes the synthetic head-detection sample if no data is there, evaluates the untrained detector
on its test split (the reference), trains the baseline with ``run_single_ofat.sh --quick`` at
``RAT_DEMO_LR`` (2e-4) for ``RAT_QUICK_EPOCHS`` (48) epochs, and prints every loss term early vs
late, untrained vs trained test AP50, whether each claim held, and the OFAT table.

Why a lower rate and more epochs than the baseline: quick mode trains on 48 images with a random,
frozen backbone, and at the baseline's lr 1e-3 the validation AP50 swings from epoch to epoch
and the total loss ends above its start. ``RAT_DEMO_LR=0.001`` runs the baseline's own rate.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import REPO

__all__ = ["loss_report", "verdict", "window_means", "main"]

BASELINE = "baseline_lr0.001_bs8_adamw_ep100"


def sh(cmd, **kw):
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, **kw)


def window_means(records, term: str, window: int):
    """``term``'s mean over the first and over the last ``window`` records."""
    head, tail = records[:window], records[-window:]
    return sum(r[term] for r in head) / len(head), sum(r[term] for r in tail) / len(tail)


def loss_report(records, window=5):
    """Each loss term's mean over the first and the last ``window`` logged iterations.

    Cascade R-CNN's box-regression terms start near 0 (hardly any proposal overlaps a head) and
    grow as the RPN learns to find heads, while the other terms fall: the total alone can rise on
    a run that is learning.
    """
    terms = sorted(k for k in records[0] if k.startswith("loss_")) + ["total_loss"]
    head, tail = records[:window], records[-window:]
    lines = [
        f"training losses, mean of the first / last {window} logged iterations "
        f"({head[0]['iteration']}-{head[-1]['iteration']} / {tail[0]['iteration']}-{tail[-1]['iteration']}):"
    ]
    for term in terms:
        first, last = window_means(records, term, window)
        lines.append(f"  {term:<22} {first:7.3f} -> {last:7.3f}")
    return "\n".join(lines)


def verdict(records, untrained_ap50: float, trained_ap50: float, window: int = 5) -> str:
    """The demo's two claims, each stated as met or not: the total loss fell (mean of the last
    ``window`` logged iterations below that of the first) and test AP50 beat the untrained model's."""
    first, last = window_means(records, "total_loss", window)
    fell = "yes" if last < first else "NO"
    beat = "yes" if trained_ap50 > untrained_ap50 else "NO"
    return (
        f"total loss fell: {fell} ({first:.3f} -> {last:.3f}); "
        f"test AP50 beat the untrained model: {beat} ({untrained_ap50:.1f} -> {trained_ap50:.1f})"
    )


def main() -> int:
    from rat_plugins.data.paths import dataset_root

    lr = os.environ.get("RAT_DEMO_LR", "0.0002")
    epochs = os.environ.get("RAT_QUICK_EPOCHS", "48")
    data = dataset_root() / "coco"
    if not (data / "train" / "_annotations.coco.json").is_file():
        print(f"== no head-detection data in {data}: writing the synthetic sample", flush=True)
        sh([sys.executable, "-m", "rat_plugins.data.synthetic", "heads", "--out", str(data)])

    # the demo's own folder (its lr differs from the baseline's): started afresh every time, so a
    # run left by an older version of the demo is never resumed into this one
    work_dirs = Path(os.environ.get("RAT_WORK_DIRS", REPO / "work_dirs")) / "demo"
    if work_dirs.exists():
        print(f"== removing the previous demo run in {work_dirs}", flush=True)
        shutil.rmtree(work_dirs)
    env = dict(os.environ, RAT_WORK_DIRS=str(work_dirs), RAT_QUICK_EPOCHS=epochs)
    script = str(REPO / "run_single_ofat.sh")
    print("== the untrained detector on the test split (reference)", flush=True)
    untrained_dir = work_dirs / "demo_untrained"
    # the quick-mode model exactly, with its heads as initialised (no checkpoint is loaded)
    sh(
        [
            script,
            BASELINE,
            "--quick",
            "--eval-only",
            "train.init_checkpoint=",
            f"optimizer.lr={lr}",
            f"train.output_dir={untrained_dir}",
        ],
        env=env,
    )
    untrained = json.loads((untrained_dir / "eval_metrics.json").read_text())["test"]["bbox"]

    print(
        f"== training the OFAT baseline in quick mode, {epochs} epochs at lr {lr} "
        "(rat_plugins/experiments/demo.py says why)",
        flush=True,
    )
    sh([script, BASELINE, "--quick", f"optimizer.lr={lr}"], env=env)
    out = work_dirs / f"ofat_{BASELINE}_quick"
    final = json.loads((out / "final_metrics.json").read_text())["test"]["bbox"]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if "total_loss" in line]
    print("\n== demo result")
    print(loss_report(records))
    print(f"test AP50: untrained {untrained['AP50']:.1f} -> trained {final['AP50']:.1f}")
    print(verdict(records, untrained["AP50"], final["AP50"]))
    sh([sys.executable, "tools/summarize_ofat.py", "--work-dirs", str(work_dirs)])
    tracked = out / "mlflow_run.json"
    if tracked.is_file():  # tracking is on unless RAT_TRACKING=0
        record = json.loads(tracked.read_text())
        print(f"\n== MLflow: run {record['run_id']} in {record['tracking_uri']}")
        print(f"   browse it: mlflow ui --backend-store-uri {record['tracking_uri']}")
    return 0
