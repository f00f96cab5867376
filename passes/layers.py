"""What a layer computes as: a torch.nn class, for subclasses that change only how
they are made.

torchvision's video ResNets build their convolutions as `Conv3DSimple(nn.Conv3d)`,
which adds a static method and an `__init__`: it computes exactly as `nn.Conv3d`.
torch.fx traces such a subclass through (it is not torch.nn's own), so its graph held
`F.conv3d` on its weight, which no strategy that rewrites convolution modules knew.
`computes_as` names the torch.nn class of such a module, the capture keeps it as one
`call_module` node, and every strategy looks its kind up through it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["computes_as"]

# the methods a subclass may define and still compute as its torch.nn base
_HARMLESS = frozenset({"__init__", "extra_repr", "reset_parameters", "_check_input_dim"})


def computes_as(module: nn.Module) -> type:
    """The torch.nn class `module` computes as: its own class where that is torch.nn's
    (or it is no torch.nn layer's subclass); else the nearest torch.nn class it derives
    from, if no class between overrides anything but how the layer is made (`__init__`,
    `reset_parameters`, `extra_repr`, an input check), static and class methods."""
    cls = type(module)
    if _torch_nn(cls):
        return cls
    for base in cls.__mro__[1:]:
        if base is nn.Module:
            return cls
        if _torch_nn(base):
            between = cls.__mro__[:cls.__mro__.index(base)]
            return base if all(_only_makes(c) for c in between) else cls
    return cls


def _torch_nn(cls: type) -> bool:
    return cls.__module__.startswith(("torch.nn.", "torch.ao.nn.")) and cls not in (nn.Module, nn.Sequential,
                                                                                   nn.ModuleList, nn.ModuleDict)


def _only_makes(cls: type) -> bool:
    """Whether `cls` defines no method or property but `_HARMLESS` ones, static and class
    methods (its other attributes are data: a docstring, constants)."""
    return not any((callable(value) or isinstance(value, property)) and name not in _HARMLESS
                   and not isinstance(value, (staticmethod, classmethod)) for name, value in vars(cls).items())
