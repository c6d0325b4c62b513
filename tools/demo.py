#!/usr/bin/env python
"""`make demo`: sample head data, the OFAT baseline in quick mode, then the results table.

1. writes the synthetic head-detection sample to datasets/coco if no data is there;
2. evaluates the untrained detector on the sample's test split (the reference point);
3. trains the OFAT baseline with ``run_single_ofat.sh ... --quick`` (validation every epoch,
   final evaluation on the test split);
4. prints every loss term early vs late in training, untrained vs trained AP50, and the OFAT table.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "baseline_lr0.001_bs8_adamw_ep100"
CONFIG = REPO / "projects/ViTDet/configs/OFAT" / f"{BASELINE}.py"


def sh(cmd, **kw):
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, **kw)


def loss_report(records, window=5):
    """Each loss term's mean over the first and the last ``window`` logged iterations.

    Cascade R-CNN's box-regression terms start near 0 (hardly any proposal overlaps a head, so
    there is little to regress) and grow as the RPN learns to find heads, while the
    classification and RPN terms fall: the total alone can rise on a run that is learning.
    """
    terms = sorted(k for k in records[0] if k.startswith("loss_")) + ["total_loss"]
    head, tail = records[:window], records[-window:]
    lines = [f"training losses, mean of the first / last {window} logged iterations "
             f"({head[0]['iteration']}-{head[-1]['iteration']} / {tail[0]['iteration']}-{tail[-1]['iteration']}):"]
    for term in terms:
        first = sum(r[term] for r in head) / len(head)
        last = sum(r[term] for r in tail) / len(tail)
        lines.append(f"  {term:<22} {first:7.3f} -> {last:7.3f}")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(REPO))
    from rat_plugins.data.paths import dataset_root

    data = dataset_root() / "coco"
    if not (data / "train" / "_annotations.coco.json").is_file():
        print(f"== no head-detection data in {data}: writing the synthetic sample", flush=True)
        sh([sys.executable, "-m", "rat_plugins.data.synthetic", "heads", "--out", str(data)])

    work_dirs = Path(os.environ.get("RAT_WORK_DIRS", REPO / "work_dirs"))
    out = work_dirs / f"ofat_{BASELINE}_quick"
    print("== the untrained detector on the test split (reference)", flush=True)
    untrained_dir = work_dirs / "demo_untrained"
    # the quick-mode model exactly, with its heads as initialised (no checkpoint is loaded)
    sh([str(REPO / "run_single_ofat.sh"), BASELINE, "--quick", "--eval-only", "train.init_checkpoint=",
        f"train.output_dir={untrained_dir}"])
    untrained = json.loads((untrained_dir / "eval_metrics.json").read_text())["test"]["bbox"]

    print("== training the OFAT baseline in quick mode", flush=True)
    sh([str(REPO / "run_single_ofat.sh"), BASELINE, "--quick"])
    final = json.loads((out / "final_metrics.json").read_text())["test"]["bbox"]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if "total_loss" in line]
    print("\n== demo result")
    print(loss_report(records))
    print(f"test AP50: untrained {untrained['AP50']:.1f} -> trained {final['AP50']:.1f}")
    sh([sys.executable, "tools/summarize_ofat.py"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
