"""Errors that say what went wrong and how to fix it."""

from __future__ import annotations


class SftkitError(ValueError):
    """Bad input detected before any training time is spent; the message ends with a fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}\nFix: {fix}")
        self.problem = problem
        self.fix = fix

    def __reduce__(self):
        # The default pickling replays ``cls(*self.args)`` with the one formatted message, which
        # would fail because __init__ needs two arguments; datasets.map(num_proc=...) and
        # DataLoader workers pickle exceptions, so keep them round-trippable.
        return (type(self), (self.problem, self.fix))
