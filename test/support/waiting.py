"""Waiting on a condition instead of the clock (a loaded CI machine can be ten times slower)."""
import time


def wait_for(predicate, timeout, message):
    """Return once ``predicate()`` is true; after ``timeout`` seconds raise AssertionError with
    ``message`` (or ``message()``, for one made when it fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(message() if callable(message) else message)
