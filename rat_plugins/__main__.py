"""``python -m rat_plugins list``: what the plugin registers, per registry, and what is unavailable."""

import argparse
import importlib
import inspect
import sys

REGISTRIES = {
    "detectron2": [
        ("BACKBONE_REGISTRY", "detectron2.modeling", "BACKBONE_REGISTRY"),
        ("META_ARCH_REGISTRY", "detectron2.modeling", "META_ARCH_REGISTRY"),
    ],
    "mmseg": [(name, "mmseg.registry", name) for name in ("MODELS", "DATASETS", "TRANSFORMS", "METRICS", "HOOKS")],
    "mmdet": [(name, "mmdet.registry", name) for name in ("MODELS", "DATASETS", "TRANSFORMS", "METRICS", "HOOKS")],
}
ADAPTERS = {"detectron2": "rat_plugins.detectron2", "mmseg": "rat_plugins.mm", "mmdet": "rat_plugins.mm"}
OPTIONAL = [
    ("mamba_ssm", "fused CUDA selective scan (GPU machines: pip install -e .[cuda])"),
    ("detectron2._C", "detectron2's compiled ops (deformable/rotated ops; COCO eval uses pycocotools)"),
    ("mmcv._ext", "mmcv's compiled ops (nms, roi_align, ...)"),
    ("resolution_aware_transformer", "RAT backbone (pip install -e .[rat])"),
    ("h5py", "event-camera data in RVT's layout (pip install -e .[events])"),
    ("hdf5plugin", "compressed RVT event files (pip install -e .[events])"),
]


def _registered_by_plugin(registry):
    names = []
    for name, obj in sorted(
        registry._obj_map.items() if hasattr(registry, "_obj_map") else registry.module_dict.items()
    ):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("rat_plugins"):
            names.append(name)
    return names


def _lazycall_components():
    """Classes of the detectron2 adapters that LazyConfig files can LazyCall."""
    import rat_plugins.detectron2 as d2

    found = []
    for mod_name in ("vim", "maxvit_rnn", "rat", "data", "engine", "schedule") + tuple(
        getattr(d2, "EXTRA_MODULES", ())
    ):
        mod = importlib.import_module(f"rat_plugins.detectron2.{mod_name}")
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found.append(f"rat_plugins.detectron2.{mod_name}.{name}")
    return found


def list_components(out=sys.stdout) -> int:
    unavailable = []
    for framework, registries in REGISTRIES.items():
        try:
            importlib.import_module(ADAPTERS[framework])
        except ImportError as e:
            unavailable.append((framework, str(e)))
            continue
        for label, module, attr in registries:
            registry = getattr(importlib.import_module(module), attr)
            names = _registered_by_plugin(registry)
            if names:
                print(f"{framework} {label}: {', '.join(names)}", file=out)
        if framework == "detectron2":
            print(f"detectron2 LazyCall targets: {', '.join(_lazycall_components())}", file=out)
    for module, what in OPTIONAL:
        try:
            importlib.import_module(module)
        except Exception as e:  # compiled extensions fail with OSError/ImportError alike
            unavailable.append((module, f"{what}: not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"))
    try:
        from rat_plugins.models.ops import selective_scan as scan

        print(f"selective scan backend on CPU: {scan.backend_for()}", file=out)
    except Exception as e:
        unavailable.append(("selective scan", f"{type(e).__name__}: {e}"))
    print("unavailable:" if unavailable else "unavailable: none", file=out)
    for name, why in unavailable:
        print(f"  {name}: {why}", file=out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rat_plugins", description=__doc__)
    parser.add_argument("command", choices=["list"])
    parser.parse_args(argv)
    return list_components()


if __name__ == "__main__":
    sys.exit(main())
