"""thaw.errors.first_line: the one line thaw logs, prints or records about an exception."""

from thaw.errors import first_line


def test_the_first_line_that_says_something():
    assert first_line(RuntimeError("\n  chunk abc missing  \nTraceback ...")) == "chunk abc missing"
    assert first_line(ValueError("bad"), typed=True) == "ValueError: bad"


def test_an_exception_that_says_nothing_is_named_by_its_type():
    # str(TimeoutError()) is "": indexing its lines raised IndexError inside the handler that logged it
    assert first_line(TimeoutError()) == "TimeoutError"
    assert first_line(OSError("  \n"), typed=True) == "OSError"
