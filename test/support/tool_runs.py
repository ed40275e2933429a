"""Running the tools in ``tools/`` from tests: load one as a module, run its ``main()``
in-process and capture what it prints."""
import contextlib
import importlib.util
import io

from locations import REPO_ROOT

TOOLS = REPO_ROOT / 'tools'
SIZES = [(96, 72), (72, 96)]
"""Image sizes of the pipeline tests' synthetic scenes."""
BASE_BUDGET = (1024, 4096)
"""The pixel budget the pipeline tests' base model was "trained" at: a handful of visual
tokens."""


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name, args):
    """Run a tool's main() in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = load_tool(name).main([str(arg) for arg in args])
    return code, out.getvalue(), err.getvalue()


def linear4bit_count(model):
    import bitsandbytes as bnb
    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
