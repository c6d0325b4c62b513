"""``python -m rat_plugins.data.synthetic <kind> --out DIR``: one JSON summary line on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from ._common import DatasetExistsError
from .coco2017 import make_coco
from .events import make_events, make_events_memory
from .fundus import make_fundus
from .head_detection import make_heads
from .isic import make_isic, make_isic_context, make_isic_radius

__all__ = ["GENERATORS", "main"]

GENERATORS: Dict[str, Callable[..., dict]] = {
    "heads": make_heads,
    "isic": make_isic,
    "isic-context": make_isic_context,
    "isic-radius": make_isic_radius,
    "fundus": make_fundus,
    "events": make_events,
    "events-memory": make_events_memory,
    "coco": make_coco,
}


def _parse_size(text: str) -> Union[int, Tuple[int, int]]:
    for sep in ("x", "X", ","):
        if sep in text:
            a, b = text.split(sep, 1)
            return int(a), int(b)
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rat_plugins.data.synthetic",
        description="Write a small deterministic synthetic dataset in a real layout; prints a JSON summary.",
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, fn in GENERATORS.items():
        p = sub.add_parser(kind, help=(fn.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--out", required=True, help="dataset folder to create (must be empty or absent)")
        p.add_argument("--n", type=int, default=None, help="size of the first split (default: see docs)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=_parse_size, default=None, help="N or WxH (isic: LO,HI range of widths/heights)")
        p.add_argument(
            "--overwrite", action="store_true", help="replace this layout's folders inside a non-empty --out"
        )
        if kind == "fundus":
            p.add_argument("--layout", choices=("raw", "mmseg"), default="raw")
        if kind == "heads":
            p.add_argument("--head-sizes", type=float, nargs=2, default=(20, 160), metavar=("LOW", "HIGH"))
            p.add_argument("--distractors", type=int, nargs=2, default=(1, 4), metavar=("LOW", "HIGH"))
        if kind == "events-memory":
            p.add_argument("--frames", type=int, default=8, help="representations per recording")
            p.add_argument("--emit", type=int, default=2, help="representations in which the object emits events")
        if kind == "events":
            p.add_argument("--frames", type=int, default=30, help="representations per sequence")
            p.add_argument("--label-every", type=int, default=2, help="label every k-th representation")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    kwargs = dict(seed=args.seed, overwrite=args.overwrite)
    if args.n is not None:
        kwargs["n"] = args.n
    if args.size is not None:
        kwargs["size"] = args.size
    if args.kind == "fundus":
        kwargs["layout"] = args.layout
    if args.kind == "events":
        kwargs.update(frames=args.frames, label_every=args.label_every)
    if args.kind == "events-memory":
        kwargs.update(frames=args.frames, emit=args.emit)
    if args.kind == "heads":
        kwargs.update(head_sizes=tuple(args.head_sizes), distractors=tuple(args.distractors))
    try:
        summary = GENERATORS[args.kind](args.out, **kwargs)
    except (DatasetExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0
