"""save and load: a rewritten module as readable Python, its layers, tensors and plan.

`save(module, folder)` writes
  module.py      the rewritten forward, and one method per recomputed segment and per
                 unit of an inverted chain, as Python (and the model's graph in eval
                 mode, where it differs: run after `.eval()`)
  leaves.json    the leaf layers (Conv2d, BatchNorm2d, ...) by module path, as data
                 (`rewriter.leaves`: class import path, plain attributes, tensors by key)
  tensors.pt     every parameter and buffer, by key (read with weights_only=True)
  plan.json      the plan
  manifest.json  the SHA-256 of each file above
`load(folder)` checks every file against the manifest before reading any, then
imports module.py and returns a module that trains as the saved one. Importing
module.py runs it, as importing any Python module does: load folders from a source
you trust (the manifest catches files changed or damaged since saving, not a folder
written to deceive). Nothing is unpickled but tensors. The code imports torch and
rewriter only; a layer of the user's own class (an opaque leaf) is imported by its
class's module path. A loaded module can be saved again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import operator
import sys
import textwrap
from pathlib import Path

import torch
from torch import fx, nn

from rewriter.passes import accumulate_ops, compressed_ops, row_split_ops
from rewriter.passes.invert import InvertChain, Unit, _Step
from rewriter.passes.recompute import RecomputeSegment
from rewriter.errors import InputError
from rewriter.leaves import decode, encode
from rewriter.plan import Plan

__all__ = ["save", "load", "build", "segment", "invert_chain"]


_PREAMBLE = [  # the names FX's generated code may use
    "import torch",
    "from math import inf, nan",
    "from torch import device",
    "import torch.fx._pytree as fx_pytree",
    "import torch.utils._pytree as pytree",
    "NoneType = type(None)",
]
_KNOWN = {"torch", "inf", "nan", "device", "fx_pytree", "pytree", "NoneType"}


def _imports(globals_: dict) -> list[str]:
    """Import lines for the graph's globals beyond FX's usual ones."""
    lines = []
    for name, value in sorted(globals_.items()):
        if name in _KNOWN:
            continue
        qualname, module = getattr(value, "__qualname__", ""), getattr(value, "__module__", None)
        if isinstance(value, str):  # an annotation written as text (`from __future__ import annotations`)
            lines.append(f"{name} = {value!r}")
        elif inspect.ismodule(value):
            lines.append(f"import {value.__name__} as {name}")
        elif any(module == ops.__name__ and getattr(ops, qualname, None) is value for ops in (accumulate_ops, compressed_ops, row_split_ops)):
            short = module.rsplit(".", 1)[-1]
            lines.append(f"{name} = rewriter.export.{short}.{qualname}")  # saved code imports rewriter only
        elif module and qualname and "<" not in qualname and "." not in qualname:
            lines.append(f"from {module} import {qualname} as {name}")
        else:
            raise InputError(f"cannot export: the graph calls {name}={value!r}, which has no importable name")
    return lines


def _method(gm: fx.GraphModule, name: str) -> tuple[str, dict]:
    code = gm.graph.python_code(root_module="self")
    source = code.src.strip().replace("def forward(self", f"def {name}(self", 1)
    return textwrap.indent(source, "    "), code.globals


_FILES = ("module.py", "leaves.json", "tensors.pt", "plan.json")


def save(module: nn.Module, folder: str | Path) -> Path:
    """Write `module` (what `optimize`, `apply_plan` or `load` returned) to `folder`."""
    saved = getattr(module, "_rewriter_saved", None)  # a module `load` made: its code as it was read
    if saved is not None:
        leaves = {"modules": {p: module.get_submodule(p) for p in saved["leaves"]},
                  "parameters": dict(module._parameters), "buffers": dict(module._buffers)}
        return _write(Path(folder), saved["code"], leaves, getattr(module, "plan", None))
    if not isinstance(module, fx.GraphModule):
        raise InputError(f"save() takes the module optimize(), apply_plan() or load() returns; got {type(module).__name__}")
    folder = Path(folder)
    methods, globals_, segments = [], {}, []
    eval_code = module.__dict__.get("eval_code")  # trace.with_eval_path
    forward, used = _method(module, "forward" if eval_code is None else "_train_forward")
    globals_.update(used)
    if eval_code is not None:
        code, used = _method(eval_code, "_eval_forward")
        methods.append(code)
        globals_.update(used)
        forward = "\n".join([
            "    def forward(self, *args, **kwargs):",
            "        step = self._train_forward if self.training else self._eval_forward",
            "        return step(*args, **kwargs)",
            "",
            forward,
        ])
    owner_paths = {id(m): path for path, m in module.named_modules()}
    buffer_paths = {id(b): path for path, b in module.named_buffers()}
    for name, child in module.named_children():
        if isinstance(child, InvertChain):
            specs = [_step_spec(step, f"_{name}_{i}", owner_paths, methods, globals_) for i, step in enumerate(child.steps)]
            segments.append(f"        self.{name} = rewriter.export.invert_chain(self, {specs!r})")
        if isinstance(child, RecomputeSegment):
            code, used = _method(child.checkpointed_code, f"_{name}")
            methods.append(code)
            globals_.update(used)
            buffers = [buffer_paths[id(b)] for b in child.stat_buffers()]
            segments.append(
                f"        self.{name} = rewriter.export.segment(self, self._{name}, {child.mode!r}, {buffers!r}, {child.keeps_output!r})"
            )
    targets = _call_targets(module)
    modules = {
        path: m for path, m in module.named_modules()
        if path and not isinstance(m, (RecomputeSegment, InvertChain)) and not any(path.startswith(t + ".") for t in targets)
        and (path in targets or (not list(m.children()) and (m._parameters or m._buffers)))
    }
    leaves = {"modules": modules, "parameters": dict(module._parameters), "buffers": dict(module._buffers)}
    class_name = type(module).__name__
    text = "\n".join([
        f'"""{class_name}, rewritten by rewriter. Load it with rewriter.load(this folder)."""',
        *_PREAMBLE,
        "import rewriter.export",
        *_imports(globals_),
        "",
        "",
        f"class {class_name}(torch.nn.Module):",
        "    def __init__(self, leaves):",
        "        super().__init__()",
        "        rewriter.export.build(self, leaves)",
        *segments,
        "",
        forward,
        *("\n" + m for m in methods),
        "",
    ])
    return _write(folder, text, leaves, getattr(module, "plan", None))


def _write(folder: Path, code: str, leaves: dict, plan: Plan | None) -> Path:
    """The folder's files, the manifest last (described before any is written: a layer
    that cannot be saved leaves the folder as it was)."""
    described, tensors = encode(leaves)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("leaves.pt", "weights.pt", "plan.json"):  # an earlier save's, or another format's
        (folder / stale).unlink(missing_ok=True)
    (folder / "module.py").write_text(code)
    (folder / "leaves.json").write_text(json.dumps(described, indent=1))
    torch.save(tensors, folder / "tensors.pt")
    if plan is not None:
        (folder / "plan.json").write_text(plan.to_json())
    files = {name: _digest(folder / name) for name in _FILES if (folder / name).exists()}
    (folder / "manifest.json").write_text(json.dumps({"format": 2, "files": files}, indent=1))
    return folder


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _step_spec(step: _Step, prefix: str, owner_paths: dict, methods: list, globals_: dict) -> dict:
    """How `invert_chain` rebuilds one step: its constants, module paths, and the names
    of the methods (appended to `methods`) that run its code."""
    spec = {"kind": step.unit.kind, "arg": step.unit.arg, "factor": step.unit.factor,
            "modules": [owner_paths[id(m)] for m in step.modules],
            "module": owner_paths[id(step.module)] if step.module is not None else None,
            "inplace": step.inplace, "inverse_dims": step.inverse_dims,
            "branches": [[_step_spec(s, f"{prefix}_b{b}_{j}", owner_paths, methods, globals_) for j, s in enumerate(branch)]
                         for b, branch in enumerate(step.branches)]}
    for part, code in (("code", step.code), ("f", step.f), ("g", step.g)):
        if code is not None:
            text, used = _method(code, f"{prefix}_{part}")
            methods.append(text)
            globals_.update(used)
            spec[part] = f"{prefix}_{part}"
    return spec


def _step_targets(step: _Step) -> set[str]:
    targets = set()
    for code in (step.code, step.f, step.g):
        if code is not None:
            targets |= {n.target for n in code.graph.nodes if n.op == "call_module"}
    for branch in step.branches:
        for inner in branch:
            targets |= _step_targets(inner)
    return targets


def _call_targets(module: fx.GraphModule) -> set[str]:
    graphs = [module.graph] + ([module.eval_code.graph] if "eval_code" in module.__dict__ else [])
    targets = {n.target for graph in graphs for n in graph.nodes if n.op == "call_module"}
    # a compressed op is handed its module (get_attr)
    targets |= {n.target for n in module.graph.nodes
                if n.op == "get_attr" and isinstance(operator.attrgetter(n.target)(module), nn.Module)}
    for child in module.children():
        if isinstance(child, RecomputeSegment):  # its calls, and the modules its ops are handed (get_attr)
            code = child.checkpointed_code
            targets |= {n.target for n in code.graph.nodes if n.op == "call_module"
                        or n.op == "get_attr" and isinstance(operator.attrgetter(n.target)(code), nn.Module)}
        if isinstance(child, InvertChain):
            for step in child.steps:
                targets |= _step_targets(step)
    return targets


def build(owner: nn.Module, leaves: dict) -> None:
    """Place each saved module at its path under `owner` (making containers on the way)
    and the root's own parameters and buffers, in the saved order."""
    for path, leaf in leaves["modules"].items():
        *parents, name = path.split(".")
        node = owner
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(name, leaf)
    for name, param in leaves["parameters"].items():
        owner.register_parameter(name, param)
    for name, buffer in leaves["buffers"].items():
        owner.register_buffer(name, buffer)


def segment(owner: nn.Module, code, mode: str, buffers: list[str], keeps_output: bool) -> RecomputeSegment:
    """A RecomputeSegment running one of `owner`'s methods, restoring the buffers at
    `buffers` (paths; in modules saved before 2026-12-06, BatchNorm module paths: all
    their buffers)."""

    def at(path: str) -> list[torch.Tensor]:
        try:
            return [owner.get_buffer(path)]
        except AttributeError:
            return list(owner.get_submodule(path).buffers())

    return RecomputeSegment(code, mode, [b for path in buffers for b in at(path)], keeps_output)


def invert_chain(owner: nn.Module, specs: list[dict]) -> InvertChain:
    """An InvertChain whose units run `owner`'s methods (as `save` described them)."""
    return InvertChain([_step_from_spec(owner, spec) for spec in specs])


def _step_from_spec(owner: nn.Module, spec: dict) -> _Step:
    arg = tuple(tuple(a) if isinstance(a, list) else a for a in spec["arg"])
    unit = Unit(spec["kind"], (), "", "", arg, factor=spec["factor"])
    return _Step(
        unit, getattr(owner, spec["code"]), [owner.get_submodule(p) for p in spec["modules"]],
        owner.get_submodule(spec["module"]) if spec["module"] else None, spec["inplace"],
        getattr(owner, spec["f"]) if "f" in spec else None, getattr(owner, spec["g"]) if "g" in spec else None,
        tuple(spec["inverse_dims"]) if spec["inverse_dims"] is not None else None,
        [[_step_from_spec(owner, s) for s in branch] for branch in spec.get("branches", [])],
    )


def load(folder: str | Path) -> nn.Module:
    """The module `save` wrote to `folder`, with its weights and (if saved) `.plan`.
    Every file is checked against the folder's manifest before any is read; then
    module.py is imported (run: load folders you trust)."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.exists():
        if (folder / "leaves.pt").exists():
            raise InputError(f"{folder} was saved by an earlier rewriter (its layers pickled in leaves.pt, which load no "
                             "longer unpickles: that runs any code in it); save the module again with this version")
        raise InputError(f"{folder} holds no manifest.json; pass a folder written by rewriter.save")
    files = _read(manifest, lambda text: json.loads(text)["files"])
    for name in ("module.py", "leaves.json", "tensors.pt"):
        if name not in files:
            raise InputError(f"{manifest} lists no {name}; pass a folder written by rewriter.save")
    for name, digest in files.items():
        if name not in _FILES:
            raise InputError(f"{manifest} lists {name!r}, which rewriter.save does not write")
        if not (folder / name).exists():
            raise InputError(f"{folder / name} is missing (the manifest lists it)")
        if _digest(folder / name) != digest:
            raise InputError(f"{folder / name} has changed since it was saved (its SHA-256 is not the manifest's); "
                             "nothing was loaded")
    described = _read(folder / "leaves.json", json.loads)
    tensors = _read(folder / "tensors.pt", lambda _: torch.load(folder / "tensors.pt", weights_only=True), binary=True)
    plan = _read(folder / "plan.json", Plan.from_json) if "plan.json" in files else None
    code = (folder / "module.py").read_text()
    name = f"rewriter_saved_{abs(hash(folder.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, folder / "module.py")
    imported = importlib.util.module_from_spec(spec)
    sys.modules[name] = imported
    try:
        spec.loader.exec_module(imported)
    except Exception as error:
        raise InputError(f"{folder / 'module.py'} fails to import: {type(error).__name__}: {error}") from error
    classes = [v for v in vars(imported).values() if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == name]
    if len(classes) != 1:
        raise InputError(f"{folder / 'module.py'} defines {len(classes)} module classes; rewriter.save writes one")
    try:
        module = classes[0](decode(described, tensors))
    except (KeyError, TypeError, AttributeError, ImportError) as error:
        raise InputError(f"{folder / 'leaves.json'} does not describe the layers module.py builds: "
                         f"{type(error).__name__}: {error}") from error
    if plan is not None:
        module.plan = plan
    object.__setattr__(module, "_rewriter_saved", {"code": code, "leaves": list(described["modules"])})
    return module


def _read(path: Path, parse, binary: bool = False):
    """`parse` of the file's text (or of nothing, where it reads the file itself), any
    failure an InputError naming the file."""
    try:
        return parse(None if binary else path.read_text())
    except Exception as error:
        raise InputError(f"{path} cannot be read: {type(error).__name__}: {error}") from error
