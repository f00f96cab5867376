"""Where planning time goes: seconds per phase (capture, profile, price, solve, verify)."""

from __future__ import annotations

import contextlib
import time

__all__ = ["PhaseClock"]


class PhaseClock:
    """Seconds spent in each named phase, each net of the phases timed inside it: a
    verification's profile counts as verify, not profile, when it runs inside
    `clock("verify")`.

    >>> clock = PhaseClock()
    >>> with clock("solve"):
    ...     with clock("verify"):
    ...         pass
    >>> sorted(clock.seconds)
    ['solve', 'verify']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds of the phases inside it

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            inner = self._inner.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + spent - inner
            if self._inner:
                self._inner[-1] += spent

    def summary(self) -> str:
        """"profile 1.2 s, solve 0.3 s, ...", in the order the phases first ran."""
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())
