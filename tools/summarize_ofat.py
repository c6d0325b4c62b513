#!/usr/bin/env python
"""Fill the OFAT comparison table from work_dirs/ofat_*: Markdown, CSV and PNG plots.

    python tools/summarize_ofat.py [--work-dirs work_dirs] [--out work_dirs]

Columns: experiment, status, mAP@0.5, mAP@0.5:0.95, AP small / medium / large (test split),
training time, best epoch (by validation mAP@0.5), peak memory. Missing or unfinished runs are
shown as such; their missing numbers are blank, never zero.
"""
import argparse
import csv
import datetime
import io
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFAT_DIR = REPO / "projects" / "ViTDet" / "configs" / "OFAT"
COLUMNS = ["experiment", "status", "mAP@0.5", "mAP@0.5:0.95", "AP_small", "AP_medium", "AP_large",
           "train_time", "best_epoch", "peak_memory_mb"]


def read_metrics(run_dir: Path):
    """Training-loss and validation records from detectron2's metrics.json (one JSON per line)."""
    losses, evals = [], []
    path = run_dir / "metrics.json"
    if not path.is_file():
        return losses, evals, None
    peak = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written while we read
        if "total_loss" in rec:
            losses.append((rec["iteration"], rec["total_loss"]))
        if "bbox/AP50" in rec:
            evals.append((rec["iteration"], rec["bbox/AP50"], rec.get("bbox/AP")))
        if "peak_memory_mb" in rec:
            peak = max(peak or 0.0, rec["peak_memory_mb"])
    return losses, evals, peak


def iters_per_epoch(run_dir: Path):
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        m = re.search(r"^\s+eval_period:\s*(\d+)", cfg.read_text(), re.M)
        if m:
            return int(m.group(1))
    return None


def training_seconds(run_dir: Path):
    log = run_dir / "log.txt"
    if not log.is_file():
        return None
    total = 0.0
    for h, m, s in re.findall(r"Total training time: (\d+):(\d+):(\d+)", log.read_text()):
        total += int(h) * 3600 + int(m) * 60 + int(s)
    return total or None


def summarize_run(name: str, run_dir: Path) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row["experiment"] = name
    if not run_dir.is_dir():
        row["status"] = "missing"
        return row
    losses, evals, peak = read_metrics(run_dir)
    final = run_dir / "final_metrics.json"
    row["status"] = "finished" if final.is_file() else ("unfinished" if losses else "not started")
    if final.is_file():
        test = (json.loads(final.read_text()).get("test") or {}).get("bbox", {})
        for col, key in (("mAP@0.5", "AP50"), ("mAP@0.5:0.95", "AP"), ("AP_small", "APs"),
                         ("AP_medium", "APm"), ("AP_large", "APl")):
            value = test.get(key)
            row[col] = "" if value is None or value != value else f"{value:.1f}"  # NaN: no such objects
    scored = [e for e in evals if e[1] == e[1]]  # NaN (nothing detected yet) never counts as best
    if scored:
        best_iter = max(scored, key=lambda e: e[1])[0]
        per_epoch = iters_per_epoch(run_dir)
        row["best_epoch"] = str(round((best_iter + 1) / per_epoch)) if per_epoch else f"iter {best_iter}"
    seconds = training_seconds(run_dir)
    if seconds:
        row["train_time"] = str(datetime.timedelta(seconds=int(seconds)))
    if peak:
        row["peak_memory_mb"] = f"{peak:.0f}"
    row["_losses"], row["_evals"] = losses, evals
    return row


def markdown(rows) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for r in rows:
        out.write("| " + " | ".join(r[c] or "—" for c in COLUMNS) + " |\n")
    return out.getvalue()


def _atomic_write(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def plot(rows, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, fname, col in (("_losses", "training loss", "ofat_loss.png", 1),
                                    ("_evals", "validation mAP@0.5", "ofat_val_map.png", 1)):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in rows:
            series = r.get(key) or []
            if series:
                ax.plot([p[0] for p in series], [p[col] for p in series], label=r["experiment"])
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        _atomic_write(out_dir / fname, lambda p: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dirs", type=Path, default=Path(os.environ.get("RAT_WORK_DIRS", REPO / "work_dirs")))
    parser.add_argument("--out", type=Path, default=None, help="where to write the table and plots")
    args = parser.parse_args(argv)
    out_dir = args.out or args.work_dirs
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem for p in OFAT_DIR.glob("*.py"))
    names.sort(key=lambda n: not n.startswith("baseline"))
    rows = [summarize_run(n, args.work_dirs / f"ofat_{n}") for n in names]
    # quick (smoke) runs appear only when present, labelled as such
    rows += [summarize_run(f"{n} (quick)", args.work_dirs / f"ofat_{n}_quick") for n in names
             if (args.work_dirs / f"ofat_{n}_quick").is_dir()]
    table = markdown(rows)
    _atomic_write(out_dir / "ofat_summary.md", lambda p: p.write_text(table))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    _atomic_write(out_dir / "ofat_summary.csv", write_csv)
    plot(rows, out_dir)
    print(table)
    print(f"written: {out_dir / 'ofat_summary.md'}, {out_dir / 'ofat_summary.csv'}, "
          f"{out_dir / 'ofat_loss.png'}, {out_dir / 'ofat_val_map.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
