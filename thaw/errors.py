"""One line about an exception: for logs, one-line CLI errors and the reasons thaw records."""

from __future__ import annotations


def first_line(e: BaseException, typed: bool = False) -> str:
    """The first non-blank line of ``str(e)``, or the exception type's name when it says nothing (``TimeoutError()``
    does). ``typed``: ``"Type: line"`` (just ``"Type"`` when it says nothing)."""
    line = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
    if typed:
        return f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line or type(e).__name__
