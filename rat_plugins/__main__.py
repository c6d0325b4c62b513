"""``python -m rat_plugins list``: what the plugin registers, per registry, and what is unavailable;
``python -m rat_plugins env``: where this process runs (launcher, rank, world, master), as the tools see it."""

import argparse
import contextlib
import importlib
import inspect
import sys
import warnings

from rat_plugins._optional import failing_package, import_failure, install_hint

REGISTRIES = {
    "detectron2": [
        ("BACKBONE_REGISTRY", "detectron2.modeling", "BACKBONE_REGISTRY"),
        ("META_ARCH_REGISTRY", "detectron2.modeling", "META_ARCH_REGISTRY"),
    ],
    "mmseg": [(name, "mmseg.registry", name) for name in ("MODELS", "DATASETS", "TRANSFORMS", "METRICS", "HOOKS")],
    "mmdet": [(name, "mmdet.registry", name) for name in ("MODELS", "DATASETS", "TRANSFORMS", "METRICS", "HOOKS")],
}
ADAPTERS = {"detectron2": "rat_plugins.detectron2", "mmseg": "rat_plugins.mm", "mmdet": "rat_plugins.mm"}
# (module, what it gives, how to get it)
OPTIONAL = [
    ("mamba_ssm", "fused CUDA selective scan", "on GPU machines: pip install -e .[cuda]"),
    (
        "detectron2._C",
        "detectron2's compiled ops (deformable/rotated ops; COCO eval uses pycocotools)",
        "nothing to do (unused here)",
    ),
    ("mmcv._ext", "mmcv's compiled ops (nms, roi_align, ...)", "run `make install`"),
    ("resolution_aware_transformer", "RAT backbone", "pip install -e .[rat]"),
    ("h5py", "event-camera data in RVT's layout", "pip install -e .[events]"),
    ("hdf5plugin", "compressed RVT event files", "pip install -e .[events]"),
]


@contextlib.contextmanager
def _quiet_framework_imports():
    """Hide the FutureWarning fvcore (imported by detectron2) triggers with torch.jit.script at
    import: it is not ours to fix and would precede the table. Other warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield


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


def _framework_rows(framework, registries, out, unavailable):
    """Print what the plugin registered into ``framework``; or note why it cannot be imported."""
    adapter = ADAPTERS[framework]
    for module in (framework, adapter):  # the framework itself first: its own error is the clearer one
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, and mmseg / mmdet's AssertionError on a foreign mmcv
            what = "cannot be imported" if module == framework else f"its adapter {adapter} cannot be imported"
            culprit = failing_package(e)
            if culprit in (None, framework, "rat_plugins"):
                culprit = framework
            else:  # another package broke it, e.g. mmdet importing a broken detectron2
                what += f": `{culprit}` fails at import"
            unavailable.append((framework, f"{what} ({import_failure(e)}); to fix: {install_hint(culprit, e)}"))
            return
    for label, module, attr in registries:
        try:
            registry = getattr(importlib.import_module(module), attr)
            names = _registered_by_plugin(registry)
        except Exception as e:
            unavailable.append((f"{framework} {label}", f"cannot be read ({import_failure(e)})"))
            continue
        if names:
            print(f"{framework} {label}: {', '.join(names)}", file=out)
    if framework == "detectron2":
        try:
            print(f"detectron2 LazyCall targets: {', '.join(_lazycall_components())}", file=out)
        except Exception as e:
            unavailable.append(("detectron2 LazyCall targets", f"cannot be listed ({import_failure(e)})"))


def list_components(out=sys.stdout) -> int:
    """Print the table; every import failure is a line under "unavailable", never a traceback."""
    unavailable = []
    with _quiet_framework_imports():
        for framework, registries in REGISTRIES.items():
            _framework_rows(framework, registries, out, unavailable)
        for module, what, fix in OPTIONAL:
            try:
                importlib.import_module(module)
            except Exception as e:  # compiled extensions fail with OSError/ImportError alike
                unavailable.append((module, f"{what}: not importable ({import_failure(e)}); to fix: {fix}"))
        try:
            from rat_plugins.models.ops import selective_scan as scan

            for device in ("cuda", "cpu"):  # what ViM's mixers will use, and why
                name, why = scan.backend_report(device)
                print(f"selective scan backend on {device.upper()}: {name} ({why})", file=out)
        except Exception as e:
            unavailable.append(("selective scan", import_failure(e)))
    print("unavailable:" if unavailable else "unavailable: none", file=out)
    for name, why in unavailable:
        print(f"  {name}: {why}", file=out)
    return 0


def show_environment(out=sys.stdout) -> int:
    """``python -m rat_plugins env``: where this process runs, as the training tools will see it."""
    import dataclasses

    from rat_plugins.cluster.environment import detect_environment

    try:
        env = detect_environment()
    except ValueError as e:  # a launcher variable that is not a number, a host not in the job's list
        print(f"error: {e}", file=sys.stderr)
        return 2
    for field in dataclasses.fields(env):
        print(f"{field.name}: {getattr(env, field.name)}", file=out)
    try:
        import torch

        cuda = torch.cuda.is_available()
        devices = torch.cuda.device_count() if cuda else 0
    except Exception as e:  # a broken torch is worth reporting, not a traceback
        print(f"torch: cannot be imported ({type(e).__name__}: {e})", file=out)
        return 0
    print(f"distributed: {env.distributed} (backend {'nccl' if cuda else 'gloo'}, {devices} CUDA devices)", file=out)
    if env.launcher.endswith("-batch"):
        print("note: this is the scheduler's batch shell (one process); start the ranks with srun / blaunch", file=out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rat_plugins", description=__doc__)
    parser.add_argument("command", choices=["list", "env"], help="list: registered components; env: the launcher")
    args = parser.parse_args(argv)
    return list_components() if args.command == "list" else show_environment()


if __name__ == "__main__":
    sys.exit(main())
