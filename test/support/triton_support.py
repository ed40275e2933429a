"""What the tests need to know about the installed Triton, and a kernel check run in its CPU
interpreter."""
import importlib.util
import os
import subprocess
import sys

from locations import REPO_ROOT, SUPPORT_DIR

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


def run_interpreter_check(script: str) -> str:
    """The output of ``test/support/<script>`` run in its own process with this repository
    importable (it picks Triton's interpreter before importing triton); fails the test with
    the output's end if the script fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    result = subprocess.run([sys.executable, str(SUPPORT_DIR / script)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
