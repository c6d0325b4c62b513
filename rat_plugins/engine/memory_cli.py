"""The memory switches' command-line flags, the same words on both tool families' training tools.

Each tool translates them into its framework's config keys (detectron2: ``train.amp``,
``train.activation_checkpointing``, ``train.clip_grad_norm``, ``train.auto_batch``; OpenMMLab:
``optim_wrapper``, the backbones' switches, the micro-batched train step).
"""

import argparse

__all__ = ["add_memory_arguments"]


def add_memory_arguments(parser: argparse.ArgumentParser, amp_help: str) -> argparse.ArgumentParser:
    """``--amp``, ``--amp-dtype``, ``--activation-checkpointing``, ``--clip-grad``, ``--auto-batch`` and
    ``--memory-budget-gb``; ``amp_help`` says what ``--amp`` means in this tool family."""
    parser.add_argument("--amp", action="store_true", help=amp_help)
    parser.add_argument(
        "--amp-dtype",
        choices=["float16", "bfloat16"],
        default=None,
        help="the autocast type: float16 with loss scaling (CUDA), bfloat16",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute the backbone blocks' activations in the backward pass (less memory, one more forward)",
    )
    parser.add_argument(
        "--clip-grad", type=float, default=None, metavar="MAX_NORM", help="clip gradients by their total norm"
    )
    parser.add_argument(
        "--auto-batch",
        action="store_true",
        help="the largest micro-batch that fits this device, gradients accumulated up to the config's batch",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="CPU: the RAM --auto-batch may plan for (default 60%% of the available memory)",
    )
    return parser
