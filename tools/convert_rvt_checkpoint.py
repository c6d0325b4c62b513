#!/usr/bin/env python
"""An RVT Lightning checkpoint (rvt-t.ckpt / rvt-s.ckpt / rvt-b.ckpt, or a run of RVT's own code) as an
mmengine checkpoint of an mmdet RecurrentYOLOX config, for tools/test.py and fine-tuning (load_from).

python tools/convert_rvt_checkpoint.py rvt-b.ckpt work_dirs/rvt-b_mmdet.pth \\
    --config projects/RVT/configs/maxvit_yolox_patch4_3scale_baseline.py [--cfg-options k=v ...]

Every tensor of the file (backbone, PAFPN, YOLOX head) must find its place in the config's model and
every parameter of the model must come from the file; otherwise exit 2 with what differs and the
config key that fixes it.
"""

import argparse
import sys

from mmengine.config import DictAction


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the RVT Lightning checkpoint (.ckpt)")
    p.add_argument("out", help="the mmengine checkpoint to write (.pth)")
    p.add_argument("--config", required=True, help="the mmdet config whose model the weights fill")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides, key=value")
    args = p.parse_args(argv)
    import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
    from rat_plugins.mm.rvt_checkpoint import build_detector_from_config, convert_rvt_checkpoint

    try:
        detector = build_detector_from_config(args.config, args.cfg_options)
        report = convert_rvt_checkpoint(args.checkpoint, args.out, detector)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.out}; evaluate it with: python tools/test.py {args.config} {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
