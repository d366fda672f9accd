"""Errors lcp reports to a user: one clear message that names the problem and the fix."""


class LcpError(Exception):
    """Base of every error lcp reports to a user (one clear message, no traceback)."""


class DivergenceError(LcpError):
    """The dynamics (or the loss, or the update) left the finite numbers.

    Raised instead of carrying NaN forward, so a run or a tuning trial ends with a reason.
    """

    def __init__(self, message: str, *, phase: str = "", iteration: int | None = None):
        super().__init__(message)
        self.phase = phase
        self.iteration = iteration


def first_line(exc: BaseException) -> str:
    """An exception's message as one short line (its type when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
