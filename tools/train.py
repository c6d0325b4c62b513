#!/usr/bin/env python
"""Train an mmseg or mmdet config (the OpenMMLab tools/train.py CLI), CPU-capable.

python tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp] [--cfg-options k=v ...]
tools/dist_train.sh CONFIG GPUS [args]       # torchrun; gloo on CPU

A run loses nothing: checkpoints are written atomically and replaced only by complete successors;
SIGTERM / SIGINT save a checkpoint at the next iteration and exit 0; --resume continues from the
newest intact checkpoint; a second run into a busy work dir, or a changed config in a work dir that
holds a run, is refused (exit 2), and so is a broken dataset split (checked before training starts,
every rank: node-local data is checked where it is read). A full disk ends the run with exit
status 1 and names the file.
"""

import errno
import sys

import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
from rat_plugins.cluster.requeue import requeue_command, requeue_current_job
from rat_plugins.engine.distributed import closing_process_group
from rat_plugins.engine.workdir_lock import WorkDirLock
from rat_plugins.mm.batch_fit import fit_runner_batch
from rat_plugins.mm.datasets import validate_config_datasets
from rat_plugins.mm.hooks import GracefulStopHook, TrainingStopped
from rat_plugins.mm.runner import (
    ConfigError,
    build_runner,
    check_run_config,
    end_tracking,
    launch_rank,
    load_config,
    prepare_training,
    record_run_config,
    resolve_resume,
    train_parser,
    turn_on_activation_checkpointing,
    write_final_metrics,
)

EXIT_CONFIG, EXIT_DISK_FULL, EXIT_INTERRUPTED = 2, 1, 130


def main(argv=None):
    args = train_parser().parse_args(argv)
    lock, work_dir, requeue = None, args.work_dir, False
    try:
        try:
            cfg = prepare_training(load_config(args))
            work_dir = cfg.work_dir
            # every split's files, masks and classes now, not at the first test; before anything is written
            validate_config_datasets(cfg)
            rank0 = launch_rank(cfg) == 0
            if rank0:
                lock = WorkDirLock(cfg.work_dir, what=f"tools/train.py {args.config}").acquire()
            check_run_config(cfg)  # every rank: all refuse together
            resume_warnings = resolve_resume(cfg, from_work_dir=bool(args.resume))
            runner = build_runner(cfg)
            if args.activation_checkpointing:
                turn_on_activation_checkpointing(runner)
            if args.auto_batch:
                fit_runner_batch(runner, cfg, args.memory_budget_gb)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        for warning in resume_warnings:
            runner.logger.warning(warning)
        if rank0:
            record_run_config(cfg, runner)
        try:
            runner.train()
        except TrainingStopped:
            runner.call_hook("after_run")  # what a finished run does: close the visualizer, restore handlers
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        stopped = any(getattr(h, "stopped_by", None) for h in runner.hooks if isinstance(h, GracefulStopHook))
        requeue = stopped and rank0 and requeue_command() is not None
        if rank0 and not stopped:
            write_final_metrics(runner)  # marks the run finished (sweeps skip it)
        if rank0:
            end_tracking(cfg, stopped)
        return 0
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = e.filename or f"a file under {work_dir or 'the work dir'}"
        message = e.strerror if "disk full" in (e.strerror or "") else f"disk full while writing {where} ({e})"
        print(f"error: {message}. tools/train.py --resume continues from the last complete checkpoint", file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print("error: interrupted (second Ctrl-C): stopped without a checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if lock is not None:
            lock.release()
        if requeue:  # after the lock's release: the requeued job takes the work dir again
            runner.logger.warning(requeue_current_job()[1])


if __name__ == "__main__":
    with closing_process_group():  # before the interpreter finalizes: no gloo thread outlives it
        status = main()
    sys.exit(status)
