"""Experiment records: hypothesis, modifications, commands and code changes, from two mmengine configs.

The experiment config holds ``experiment = dict(hypothesis=str, success_criteria=[str, ...],
failure_criteria=[str, ...])`` (optional ``name``, ``gpus``, ``variants=dict(name=['key=value', ...])``);
the record is a function of the two configs and the code they resolve to, so a rerun writes the
same files and a record that differs is only replaced on request.
"""

import argparse
import ast
import hashlib
import importlib
import inspect
import os
import os.path as osp
import sys

from rat_plugins.utils.atomic import atomic_write_text
from rat_plugins.utils.config_keys import ConfigError

from . import REPO

__all__ = [
    "FILES",
    "RecordError",
    "load",
    "flatten",
    "diff",
    "experiment_fields",
    "check_variants",
    "base_files",
    "render",
    "write_record",
    "record_for_run",
    "main",
]

FILES = ("hypothesis.md", "modifications.md", "command.md", "code_changes.md")
_REPO = str(REPO)


class RecordError(Exception):
    """A config or an output folder the record cannot be written from / to."""


# ----------------------------------------------------------------------------- configs
def load(path: str):
    from mmengine.config import Config

    if not osp.isfile(path):
        raise RecordError(f"config file not found: {path}")
    try:
        return Config.fromfile(path)
    except Exception as e:  # a syntax error, a missing _base_, ...: name the file
        raise RecordError(f"cannot load config {path}: {type(e).__name__}: {e}") from e


def plain(value):
    """ConfigDict / tuple trees as plain dicts / lists (tuples stay tuples: they are what ran)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def flatten(tree, prefix=""):
    """``{dotted key: leaf}``; dicts and lists holding dicts are walked (list items by index),
    lists / tuples of plain values are leaves."""
    out = {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    empty = True
    for k, v in items:
        empty = False
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    if empty and prefix:
        out[prefix] = tree
    return out


def config_tree(cfg) -> dict:
    tree = plain(cfg.to_dict())
    tree.pop("experiment", None)  # documentation of the run, not a setting of it
    return tree


def diff(base: dict, exp: dict):
    """``(added, removed, changed)`` over flattened keys; changed holds ``(key, old, new)``."""
    fb, fe = flatten(base), flatten(exp)
    added = sorted((k, fe[k]) for k in fe.keys() - fb.keys())
    removed = sorted((k, fb[k]) for k in fb.keys() - fe.keys())
    changed = sorted(
        (k, fb[k], fe[k]) for k in fb.keys() & fe.keys() if fb[k] != fe[k] or type(fb[k]) is not type(fe[k])
    )
    return added, removed, changed


def _strings(items) -> bool:
    return all(isinstance(s, str) and s.strip() for s in items)


def experiment_fields(cfg, path: str) -> dict:
    exp = cfg.get("experiment")
    if exp is None:
        raise RecordError(
            f"{path} has no top-level `experiment` field; add experiment = dict(hypothesis='...', "
            "success_criteria=['...'], failure_criteria=['...'])"
        )
    exp = plain(exp)
    if not isinstance(exp, dict):
        raise RecordError(f"{path}: `experiment` must be a dict, got {type(exp).__name__}")
    hyp = exp.get("hypothesis")
    if not isinstance(hyp, str) or not hyp.strip():
        raise RecordError(f"{path}: experiment.hypothesis must be a non-empty string")
    for key in ("success_criteria", "failure_criteria"):
        crit = exp.get(key)
        if not isinstance(crit, (list, tuple)) or not crit or not _strings(crit):
            raise RecordError(f"{path}: experiment.{key} must be a non-empty list of strings")
    variants = exp.get("variants") or {}
    if not isinstance(variants, dict) or not all(
        isinstance(v, (list, tuple)) and all(isinstance(o, str) and "=" in o for o in v) for v in variants.values()
    ):
        raise RecordError(f"{path}: experiment.variants must be dict(name=['key=value', ...])")
    gpus = exp.get("gpus", 1)
    if not isinstance(gpus, int) or gpus < 1:
        raise RecordError(f"{path}: experiment.gpus must be a positive integer, got {gpus!r}")
    return exp


def check_variants(cfg, exp: dict, path: str):
    """Every variant's options must pass the key check tools/train.py applies to ``--cfg-options``."""
    from mmengine.config import DictAction

    from rat_plugins.mm.runner import check_options

    for name, options in (exp.get("variants") or {}).items():
        ns = argparse.Namespace()
        DictAction(option_strings=[], dest="o")(None, ns, list(options))
        try:
            check_options(cfg, ns.o)
        except ConfigError as e:
            raise RecordError(f"{path}: experiment.variants.{name}: {e}") from e


# ----------------------------------------------------------------------------- components
def component_types(tree: dict) -> dict:
    """``{dotted key of a dict with a string 'type': type name}``."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                out[prefix or "<root>"] = node["type"]
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{prefix}.{i}")

    walk(tree, "")
    return out


def own_arguments(changed_keys, comp_key: str, types: dict) -> list:
    """The changed keys that are arguments of ``comp_key`` itself (not of a component nested in it)."""
    nested = [k for k in types if k != comp_key and k.startswith(comp_key + ".")]
    return sorted(
        k[len(comp_key) + 1 :]
        for k in changed_keys
        if k.startswith(comp_key + ".") and not any(k.startswith(n + ".") for n in nested)
    )


def resolve(type_name: str, scope: str):
    """``(registry name, 'module.Class', source file)`` of a registered type, or None."""
    from mmengine.registry import DefaultScope, Registry

    try:
        reg_mod = importlib.import_module(f"{scope}.registry")
    except ImportError:
        reg_mod = importlib.import_module("mmengine.registry")
    registries = [(n, r) for n, r in vars(reg_mod).items() if isinstance(r, Registry) and not n.startswith("MMENGINE_")]
    with DefaultScope.overwrite_default_scope(scope):
        for name, reg in registries:
            try:
                obj = reg.get(type_name)
            except Exception:  # noqa: BLE001  (a registry whose lazy imports fail says nothing about this type)
                obj = None
            if obj is not None:
                try:
                    src = inspect.getsourcefile(obj)
                except TypeError:
                    src = None
                if src and osp.abspath(src).startswith(_REPO + os.sep):
                    src = osp.relpath(src, _REPO)
                elif src:
                    src = "<site-packages>/" + src.split("site-packages" + os.sep, 1)[-1]
                return name, f"{obj.__module__}.{obj.__qualname__}", src
    return None


def import_custom(cfg):
    custom = cfg.get("custom_imports")
    if custom:
        from mmengine.utils import import_modules_from_strings

        import_modules_from_strings(**plain(custom))


# ----------------------------------------------------------------------------- rendering
def _fmt(value) -> str:
    return f"`{value!r}`"


def _rel(path: str) -> str:
    path = osp.abspath(path)
    return osp.relpath(path, _REPO) if path.startswith(_REPO + os.sep) else path


def base_files(path: str) -> list:
    """The ``_base_`` entries of a Python config file, as written (``[]`` when it has none)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets):
            bases = ast.literal_eval(node.value)
            return [bases] if isinstance(bases, str) else list(bases)
    return []


def config_sources(path: str) -> list:
    """The config file and every file it inherits from, with their sha256 (what the record is of)."""
    seen, out, todo = set(), [], [osp.abspath(path)]
    while todo:
        p = todo.pop(0)
        if p in seen:
            continue
        seen.add(p)
        with open(p, "rb") as f:
            out.append((_rel(p), hashlib.sha256(f.read()).hexdigest()[:16]))
        try:
            bases = base_files(p)
        except (SyntaxError, ValueError):  # not a literal _base_: mmengine loaded it, so nothing is lost
            bases = []
        # package configs (mmdet::...) and {{ }} templates are not files next to this one
        todo += [osp.normpath(osp.join(osp.dirname(p), b)) for b in bases if "::" not in b and "{{" not in b]
    return out


def _header(title, cfg_path, base_path, exp):
    name = exp.get("name")
    return [
        f"# {title}: {name}" if name else f"# {title}",
        "",
        f"Experiment config: `{_rel(cfg_path)}`  ",
        f"Baseline config: `{_rel(base_path)}`",
        "",
        "_Generated by `tools/experiment_record.py` from the configs; edit the configs, not this file._",
        "",
    ]


def render_hypothesis(cfg_path, base_path, exp) -> str:
    lines = _header("Hypothesis", cfg_path, base_path, exp)
    lines += ["## Hypothesis", "", exp["hypothesis"].strip(), "", "## Success criteria", ""]
    lines += [f"- {c}" for c in exp["success_criteria"]]
    lines += ["", "## Failure criteria", ""]
    lines += [f"- {c}" for c in exp["failure_criteria"]]
    return "\n".join(lines) + "\n"


def render_modifications(cfg_path, base_path, exp, added, removed, changed) -> str:
    lines = _header("Modifications", cfg_path, base_path, exp)
    lines += [
        "Resolved configs (`_base_` merged) compared key by key; the `experiment` field is left out.",
        "",
        f"{len(changed)} changed, {len(added)} added, {len(removed)} removed.",
        "",
        "## Changed",
        "",
    ]
    lines += [f"- `{k}`: {_fmt(o)} -> {_fmt(n)}" for k, o, n in changed] or ["(none)"]
    lines += ["", "## Added", ""]
    lines += [f"- `{k}` = {_fmt(v)}" for k, v in added] or ["(none)"]
    lines += ["", "## Removed", ""]
    lines += [f"- `{k}` (was {_fmt(v)})" for k, v in removed] or ["(none)"]
    lines += ["", "## Config sources", ""]
    lines += [f"- `{p}` sha256 `{h}`" for p, h in config_sources(cfg_path)]
    lines += [f"- baseline `{p}` sha256 `{h}`" for p, h in config_sources(base_path)]
    return "\n".join(lines) + "\n"


def render_command(cfg_path, base_path, cfg, exp) -> str:
    rel = _rel(cfg_path)
    work = f"work_dirs/{osp.splitext(osp.basename(cfg_path))[0]}"
    lib = cfg.get("default_scope", "mmdet")
    stock = (
        f"python \"$(python -c 'import {lib}, os; print(os.path.dirname({lib}.__file__))')/.mim/tools/train.py\" "
        f"{rel} --work-dir {work}"
    )
    lines = _header("Training command", cfg_path, base_path, exp)
    lines += [
        "Run from the repository root with the data under `$RAT_DATASETS` (see `datasets/README.md`).",
        "",
        "## The project's tools",
        "",
        "```bash",
        f"python tools/train.py {rel} --work-dir {work}",
        f"tools/dist_train.sh {rel} {exp.get('gpus', 1)} --work-dir {work}",
        "```",
        "",
        f"## {lib}'s stock `tools/train.py`",
        "",
        "(`rat_plugins` installed in the environment: the config's `custom_imports` registers it)",
        "",
        "```bash",
        stock,
        "```",
        "",
    ]
    variants = exp.get("variants") or {}
    if variants:
        lines += ["## Variants", ""]
        for name, options in variants.items():
            lines += [
                f"### {name}",
                "",
                "```bash",
                f"python tools/train.py {rel} --work-dir {work}_{name} --cfg-options {' '.join(options)}",
                "```",
                "",
            ]
    return "\n".join(lines)


def render_code_changes(cfg_path, base_path, cfg, base, exp, changed_keys) -> str:
    import_custom(cfg)
    import_custom(base)
    scope = cfg.get("default_scope", "mmdet")
    t_base, t_exp = component_types(config_tree(base)), component_types(config_tree(cfg))
    base_names = set(t_base.values())
    lines = _header("Code changes", cfg_path, base_path, exp)
    lines += [
        f"Registered components (`type=...`) of the experiment config, resolved through the `{scope}` registries.",
        "",
        "## Components the baseline does not use",
        "",
    ]
    new = [(k, t) for k, t in sorted(t_exp.items()) if t not in base_names]
    for key, t in new:
        where = resolve(t, scope)
        if where is None:
            lines.append(f"- `{key}`: `{t}` (not found in any `{scope}` registry)")
            continue
        reg, cls, src = where
        was = t_base.get(key)
        args = [a for a in own_arguments(changed_keys, key, t_exp) if a != "type"]
        lines.append(
            f"- `{key}`: `{t}` -> `{cls}` ({reg}, `{src}`)"
            + (f"; baseline: `{was}`" if was else "")
            + ("; arguments set or changed: " + ", ".join(f"`{a}`" for a in args) if args else "")
        )
    if not new:
        lines.append("(none)")
    lines += ["", "## Components used by both whose arguments changed", ""]
    same = []
    for key, t in sorted(t_exp.items()):
        if key != "<root>" and t_base.get(key) == t:
            args = own_arguments(changed_keys, key, t_exp)
            if args:
                where = resolve(t, scope)
                cls = f" -> `{where[1]}`" if where else ""
                same.append(f"- `{key}`: `{t}`{cls}; changed: " + ", ".join(f"`{a}`" for a in args))
    lines += same or ["(none)"]
    dropped = sorted(base_names - set(t_exp.values()))
    lines += ["", "## Baseline components no longer used", ""]
    lines += [f"- `{t}`" for t in dropped] or ["(none)"]
    return "\n".join(lines) + "\n"


def render(cfg_path, base_path, cfg, base, exp) -> dict:
    """``{file name: Markdown}`` of the record."""
    added, removed, changed = diff(config_tree(base), config_tree(cfg))
    changed_keys = {k for k, _, _ in changed} | {k for k, _ in added}
    return {
        "hypothesis.md": render_hypothesis(cfg_path, base_path, exp),
        "modifications.md": render_modifications(cfg_path, base_path, exp, added, removed, changed),
        "command.md": render_command(cfg_path, base_path, cfg, exp),
        "code_changes.md": render_code_changes(cfg_path, base_path, cfg, base, exp, changed_keys),
    }


# ----------------------------------------------------------------------------- writing
def write_record(files: dict, out: str, force: bool = False) -> list:
    """Write the files; refuse (before writing any) when one exists with other content and not ``force``.
    Returns ``[(name, 'written' | 'unchanged' | 'overwritten')]``."""
    os.makedirs(out, exist_ok=True)
    status = {}
    for name, text in files.items():
        path = osp.join(out, name)
        if not osp.exists(path):
            status[name] = "written"
            continue
        with open(path, encoding="utf-8") as f:
            status[name] = "unchanged" if f.read() == text else "overwritten"
    differing = [n for n, s in status.items() if s == "overwritten"]
    if differing and not force:
        raise RecordError(
            f"{out} already holds a different record ({', '.join(differing)} differ from what the "
            "configs give now: a config or the code changed since it was written). Not overwriting; "
            "rerun with --force to replace it, or write it elsewhere with --out."
        )
    for name, text in files.items():
        if status[name] != "unchanged":
            atomic_write_text(osp.join(out, name), text)
    return list(status.items())


def record_for_run(config_path: str, out: str) -> list:
    """The record of a config that holds ``experiment``, against the config it inherits from first
    (its baseline), written into ``out`` (a run's work dir); returns the files' paths."""
    bases = [b for b in base_files(config_path) if "::" not in b and "{{" not in b]
    if not bases:
        raise RecordError(f"{config_path} inherits from no config file: no baseline to write its record against")
    base_path = osp.normpath(osp.join(osp.dirname(config_path), bases[0]))
    cfg, base = load(config_path), load(base_path)
    files = render(config_path, base_path, cfg, base, experiment_fields(cfg, config_path))
    write_record(files, out, force=True)  # the run's own copy: the config that ran is the truth
    return [osp.join(out, name) for name in files]


def main(argv=None) -> int:
    """``tools/experiment_record.py``."""
    p = argparse.ArgumentParser(
        description="Write an experiment's record (hypothesis, modifications, command, code changes) from its configs."
    )
    p.add_argument("config", help="the experiment's config")
    p.add_argument("--baseline", required=True, help="the config it is compared against")
    p.add_argument("--out", help="output folder (default: work_dirs/records/<config stem>/)")
    p.add_argument("--force", action="store_true", help="overwrite an existing record that differs")
    args = p.parse_args(argv)
    out = args.out or osp.join("work_dirs", "records", osp.splitext(osp.basename(args.config))[0])
    try:
        cfg, base = load(args.config), load(args.baseline)
        exp = experiment_fields(cfg, args.config)
        base_exp = plain(base.get("experiment") or {})
        if (
            osp.abspath(args.config) != osp.abspath(args.baseline)
            and isinstance(base_exp, dict)
            and base_exp.get("hypothesis") == exp["hypothesis"]
        ):
            raise RecordError(
                f"{args.config}: experiment.hypothesis is the baseline's (inherited from "
                f"{args.baseline}?); give the experiment its own, with "
                "experiment = dict(_delete_=True, ...)"
            )
        check_variants(cfg, exp, args.config)
        files = render(args.config, args.baseline, cfg, base, exp)
        status = write_record(files, out, args.force)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in status:
        print(f"{s:11s} {osp.join(out, name)}")
    return 0
