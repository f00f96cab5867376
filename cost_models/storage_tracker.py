"""Count the bytes of tensor storages that come alive and die while ops run.

The CPU half of the measurement protocol in ARCHITECTURE.md: a `TorchDispatchMode`
sees every op, forward and backward (the CPU autograd engine runs in the calling
thread and keeps the mode). A storage that an op returns and that is not one of the
op's own inputs' storages is new: its bytes are added. A weak reference to the
storage's Python object (which PyTorch keeps as long as the storage itself) calls back
when it is freed; before each op, and when asked, the storages freed since are
subtracted, so each check costs the storages that died, not all that live. Storages
that existed before tracking began (parameters, inputs, gradients) are never counted,
since an op that returns them returns a view of an input.

The same tracker runs on fake tensors, where byte counts may be symbolic (SymInt):
it then keeps the sequence of events instead of a numeric peak. There, `transient`
can add what an op holds only while it runs (a CUDA workspace) as an allocation freed
right after the op's outputs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["StorageTracker", "storage_key", "tensors_in"]

_DEVICE = torch.ops.prim.device.default  # a fake tensor's device: answered as the fake tensor answers it


def storage_key(tensor: torch.Tensor) -> int:
    """A stable identity of the storage under `tensor` (shared by all its views)."""
    return StorageWeakRef(tensor.untyped_storage()).cdata


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of lists, tuples and dicts."""
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _op_tensors(value: Any, found: list) -> list:
    """The tensors in an op's arguments or results (tensors, and lists, tuples and dicts
    of them, at the dispatcher: what `tensors_in` finds, without pytree's generality)."""
    if isinstance(value, torch.Tensor):
        if value.layout == torch.sparse_coo:  # no storage of its own: its indices' and values'
            found += [value._indices(), value._values()]
        else:
            found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _op_tensors(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _op_tensors(item, found)
    return found


@dataclass
class _Live:
    ref: StorageWeakRef
    nbytes: Any  # int, or SymInt under a symbolic shape environment
    uid: int
    death: Any = None  # the weakref whose callback reports the storage freed


class StorageTracker(TorchDispatchMode):
    """Adds each new storage's bytes and subtracts them when it is freed.

    `current` and `peak` are kept when byte counts are plain ints. With
    `record_events`, `events` lists ("alloc", key, nbytes) and ("free", key, nbytes)
    in order instead, for replay with symbolic sizes; ids are the tracker's own uids,
    never reused. `transient(func, args, kwargs)` (with `record_events` only) gives the
    bytes an op holds beyond its outputs while it runs (None: not such an op);
    `storage_bytes(func, args, kwargs, output)` the bytes of the storage the real kernel
    returns `output` on where that differs from a fake tensor's (None: it does not).
    `kernel(func, args, kwargs)`, where given, runs an op in its stead (its outputs, or
    NotImplemented where it does not: then the op runs).
    """

    def __init__(self, record_events: bool = False, transient: Callable[..., int] | None = None,
                 storage_bytes: Callable[..., Any] | None = None, kernel: Callable[..., Any] | None = None) -> None:
        super().__init__()
        if (transient is not None or storage_bytes is not None) and not record_events:
            raise ValueError("StorageTracker: transient and storage bytes are recorded as events; pass record_events=True")
        self.record_events = record_events
        self.transient = transient
        self.storage_bytes = storage_bytes
        self.kernel = kernel
        self.current = 0
        self.peak = 0
        self.live: dict[int, _Live] = {}
        self._died: list[tuple[int, int]] = []  # (key, uid) of storages freed since the last poll
        self._watched: dict[int, _Live] = {}  # live storages that cannot call back: `poll` checks each
        self.events: list[tuple[str, int, Any]] = []
        self._next_uid = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """torch.compile runs its compiled code under this mode, which it turns off only
        while it compiles: a compiled module's step is counted as it runs. (A mode that
        says False makes dynamo run the eager code instead, and skip that code for good.)"""
        return True

    def pin(self, tensors: list[torch.Tensor]) -> None:
        """The caller holds these tensors for the rest of tracking: their storages cannot
        be freed, so `poll` stops checking them (it is called before every op; only
        storages that cannot call back are checked)."""
        for tensor in tensors:
            self._watched.pop(storage_key(tensor), None)

    def reserve(self, count: int) -> int:
        """The first of `count` consecutive ids that no storage will get (for records made
        without running ops)."""
        first = self._next_uid
        self._next_uid += count
        return first

    def uid_of(self, tensor: torch.Tensor) -> int | None:
        """The id this tracker gave the storage under `tensor`, or None if it is not tracked."""
        entry = self.live.get(storage_key(tensor))
        return None if entry is None else entry.uid

    def poll(self) -> None:
        """Subtract the storages that have been freed since the last poll."""
        died = self._died[:]  # in place: the callbacks hold this list
        del self._died[: len(died)]
        for key in [key for key, entry in self._watched.items() if entry.ref.expired()]:
            died.append((key, self._watched.pop(key).uid))
        for key, uid in died:
            entry = self.live.get(key)
            if entry is None or entry.uid != uid:
                continue
            del self.live[key]
            if self.record_events:
                self.events.append(("free", entry.uid, entry.nbytes))
            else:
                self.current -= entry.nbytes

    def _watch(self, key: int, storage, entry: _Live) -> None:
        """Have `storage` report its death (or, where it cannot, be checked at each poll)."""
        died, uid = self._died, entry.uid
        try:
            entry.death = weakref.ref(storage, lambda _: died.append((key, uid)))
        except TypeError:
            self._watched[key] = entry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE and isinstance(args[0], FakeTensor):  # a query, asked thousands of times in a
            return torch.device("meta") if args[0].fake_mode.in_kernel_invocation else args[0].fake_device  # backward
        self.poll()
        kwargs = kwargs or {}
        inputs = {storage_key(t) for t in _op_tensors((args, kwargs), [])}
        out = NotImplemented if self.kernel is None else self.kernel(func, args, kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        for tensor in _op_tensors(out, []):
            storage = tensor.untyped_storage()
            key = StorageWeakRef(storage).cdata
            if key in inputs or key in self.live:
                continue
            nbytes = storage.nbytes()
            if self.storage_bytes is not None:
                real = self.storage_bytes(func, args, kwargs, tensor)
                nbytes = nbytes if real is None else real
            self.live[key] = entry = _Live(StorageWeakRef(storage), nbytes, self._next_uid)
            self._watch(key, storage, entry)
            if self.record_events:
                self.events.append(("alloc", self._next_uid, nbytes))
            else:
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            self._next_uid += 1
        extra = self.transient(func, args, kwargs) if self.transient is not None else None
        if extra is not None:
            self.events += [("alloc", self._next_uid, extra), ("free", self._next_uid, extra)]
            self._next_uid += 1
        return out
