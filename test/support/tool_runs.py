"""Running the tools in ``tools/`` from tests: load one as a module, run its ``main()``
in-process and capture what it prints, or run one in its own process."""
import contextlib
import importlib.util
import io
import subprocess
import sys

from locations import REPO_ROOT

TOOLS = REPO_ROOT / 'tools'
SIZES = [(96, 72), (72, 96)]
"""Image sizes of the pipeline tests' synthetic scenes."""
BASE_BUDGET = (1024, 4096)
"""The pixel budget the pipeline tests' base model was "trained" at: a handful of visual
tokens."""


def load_tool(name):
    """``tools/<name>.py`` as a module, imported as ``python3 tools/<name>.py`` runs it: with
    ``tools/`` first on ``sys.path`` (the benchmark imports its parts, ``tools/benchmarking``,
    from there), which is put back as it was after the import."""
    spec = importlib.util.spec_from_file_location(f'tool_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.path.insert(0, str(TOOLS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def run_tool(name, args):
    """Run a tool's main() in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = load_tool(name).main([str(arg) for arg in args])
    return code, out.getvalue(), err.getvalue()


def make_scenes(folder, count, seed):
    """tools/make_scenes.py in its own process: ``count`` synthetic scenes of ``seed`` (images
    and COCO ``annotations.json``) into ``folder``; returns ``folder``."""
    subprocess.run([sys.executable, str(TOOLS / 'make_scenes.py'), '--out', str(folder),
                    '--count', str(count), '--seed', str(seed)], check=True, capture_output=True)
    return folder


def linear4bit_count(model):
    import bitsandbytes as bnb
    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
