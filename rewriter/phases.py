"""Where planning time goes: seconds per phase (capture, profile, price, solve, verify),
and progress within a long one, logged at INFO (shown where the caller asks for it:
`optimize(verbose=True)`, the command line, or logging configured at INFO)."""

from __future__ import annotations

import contextlib
import logging
import time

__all__ = ["PhaseClock", "Progress", "PROGRESS_SECONDS", "verbose_logging"]

log = logging.getLogger("rewriter.progress")

PROGRESS_SECONDS = 3.0  # a phase running longer says how far it is, this often


class Progress:
    """Logs "`what`: done/total" at most every PROGRESS_SECONDS, from the first tick
    that comes that long after it began."""

    def __init__(self, what: str, total: int | None = None):
        self.what, self.total = what, total
        self.last = time.perf_counter()

    def tick(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            log.info("%s: %d%s", self.what, done, f"/{self.total}" if self.total is not None else "")


@contextlib.contextmanager
def verbose_logging(on: bool):
    """Within it, where `on`, rewriter's INFO records go to standard error (unless the
    "rewriter" logger or the root logger has a handler already: the caller's
    configuration stands)."""
    logger = logging.getLogger("rewriter")
    if not on or logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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
    def __call__(self, phase: str, what: str = ""):
        """Time `phase` (`what`: which instance of it, for the log)."""
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
            log.info("%s%s: %.1f s", phase, f" ({what})" if what else "", spent)

    def summary(self) -> str:
        """"profile 1.2 s, solve 0.3 s, ...", in the order the phases first ran."""
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())
