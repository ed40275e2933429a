"""What the tests need to know about the installed Triton."""
import importlib.util

TRITON_MISSING = importlib.util.find_spec('triton') is None


def interpreter_cannot_loop() -> bool:
    """Triton's interpreter before 3.9 cannot run a loop over a runtime bound (the kernels'
    loops) with numpy >= 2.3 (it turns a one-element array into an int)."""
    if TRITON_MISSING:
        return False
    import numpy
    import triton

    def version(text):
        return tuple(int(part) for part in text.split('.')[:2] if part.isdigit())
    return version(triton.__version__) < (3, 9) and version(numpy.__version__) >= (2, 3)
