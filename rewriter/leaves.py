"""A saved module's layers as data, not pickles: `encode` describes each layer by its
class's import path, its plain attributes (numbers, strings, booleans, None, and
tuples and lists of them) and its submodules, parameters and buffers by name, with
the tensors apart (a dict `torch.load(weights_only=True)` reads); `decode` rebuilds
the layers from that without running any constructor. A layer holding anything else
(a function, an arbitrary object, a hook) is refused with the attribute named. Shared
layers and tied parameters stay shared.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from rewriter.errors import InputError

__all__ = ["encode", "decode"]

_MODULE_STATE = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"}
_HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_SCALARS = (bool, int, float, str, type(None))


def _plain(value: Any, where: str) -> Any:
    """`value` as JSON (tuples tagged), or InputError naming `where`."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_plain(v, where) for v in value]}
    if isinstance(value, list):
        return [_plain(v, where) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise InputError(f"cannot save {where}: it is a {type(value).__name__}, which rewriter.save keeps only as plain "
                     "data (numbers, strings, tuples); hold it in a parameter, a buffer or a submodule instead")


def _unplain(value: Any) -> Any:
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_unplain(v) for v in value["tuple"])
        if "dtype" in value:
            return getattr(torch, value["dtype"])
    return value


def encode(leaves: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`leaves` (as `export.build` takes them: "modules" by path, and the root's own
    "parameters" and "buffers" by name) described, and their tensors by key."""
    tensors: dict[str, torch.Tensor] = {}
    seen_modules: dict[int, str] = {}
    seen_tensors: dict[int, str] = {}

    def tensor(value: torch.Tensor | None, key: str) -> Any:
        if value is None:
            return None
        if id(value) in seen_tensors:
            return {"same_as": seen_tensors[id(value)]}
        seen_tensors[id(value)] = key
        tensors[key] = value.detach()
        return {"key": key, "requires_grad": value.requires_grad} if isinstance(value, nn.Parameter) else {"key": key}

    def module(value: nn.Module, path: str) -> dict[str, Any]:
        if id(value) in seen_modules:
            return {"same_as": seen_modules[id(value)]}
        seen_modules[id(value)] = path
        cls = type(value)
        if "<" in cls.__qualname__ or cls.__module__ == "__main__":
            raise InputError(f"cannot save layer {path!r}: its class {cls.__qualname__} is defined where it cannot be "
                             "imported again (a script or a function); define it in a module")
        hooks = [name for name in _HOOKS if getattr(value, name, None)]
        if hooks:
            raise InputError(f"cannot save layer {path!r}: it has hooks ({', '.join(hooks)}), which are code")
        attributes = {name: _plain(v, f"layer {path!r}'s attribute {name!r}") for name, v in vars(value).items()
                      if name not in _MODULE_STATE and name not in _HOOKS}
        return {
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "training": value.training,
            "attributes": attributes,
            "parameters": {n: tensor(p, f"{path}.{n}") for n, p in value._parameters.items()},
            "buffers": {n: tensor(b, f"{path}.{n}") for n, b in value._buffers.items()},
            "non_persistent": sorted(value._non_persistent_buffers_set),
            "modules": {n: None if m is None else module(m, f"{path}.{n}") for n, m in value._modules.items()},
        }

    described = {
        "modules": {path: module(m, path) for path, m in leaves["modules"].items()},
        "parameters": {n: tensor(p, f"root:{n}") for n, p in leaves["parameters"].items()},
        "buffers": {n: tensor(b, f"root:{n}") for n, b in leaves["buffers"].items()},
    }
    return described, tensors


def decode(described: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The leaves `encode` described (as `export.build` takes them), with their tensors
    from `tensors`."""
    built: dict[str, nn.Module] = {}
    made: dict[str, torch.Tensor] = {}

    def tensor(spec: Any, parameter: bool) -> torch.Tensor | None:
        if spec is None:
            return None
        if "same_as" in spec:
            return made[spec["same_as"]]
        value = tensors[spec["key"]]
        made[spec["key"]] = nn.Parameter(value, requires_grad=spec["requires_grad"]) if parameter else value
        return made[spec["key"]]

    def module(spec: dict[str, Any], path: str) -> nn.Module:
        if "same_as" in spec:
            return built[spec["same_as"]]
        module_name, _, qualname = spec["class"].partition(":")
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InputError(f"layer {path!r}: {spec['class']} is not a torch.nn.Module class")
        value = cls.__new__(cls)
        nn.Module.__init__(value)
        built[path] = value
        vars(value).update({name: _unplain(v) for name, v in spec["attributes"].items()})
        value.training = spec["training"]
        for name, p in spec["parameters"].items():
            value._parameters[name] = tensor(p, parameter=True)
        for name, b in spec["buffers"].items():
            value._buffers[name] = tensor(b, parameter=False)
        value._non_persistent_buffers_set = set(spec["non_persistent"])
        for name, child in spec["modules"].items():
            value._modules[name] = None if child is None else module(child, f"{path}.{name}")
        return value

    return {
        "modules": {path: module(spec, path) for path, spec in described["modules"].items()},
        "parameters": {n: tensor(p, parameter=True) for n, p in described["parameters"].items()},
        "buffers": {n: tensor(b, parameter=False) for n, b in described["buffers"].items()},
    }
