"""Node names for what a pass adds to a graph."""

from __future__ import annotations

from typing import Collection

__all__ = ["fresh_name"]


def fresh_name(name: str, taken: Collection[str]) -> str:
    """`name`, or `name` with a number, not among `taken` (so that gm's own nodes keep theirs)."""
    candidate, count = name, 0
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    return candidate
