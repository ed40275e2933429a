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


def compile_for_gpu(kernel, signature: dict, constexprs: dict, capability: int,
                    num_warps: int = 4) -> bytes:
    """The cubin Triton builds for ``kernel`` on a CUDA GPU of ``capability`` (e.g. 87 for a
    Jetson Orin), here, without a GPU: Triton's own compiler and the ptxas its wheel brings.
    ``signature``: argument name -> Triton type ('*bf16', 'i32', 'fp32'; 'constexpr' for the
    names in ``constexprs``)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = list(inspect.signature(kernel.fn).parameters)
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value
                                   for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget('cuda', capability, 32),
                              options=dict(num_warps=num_warps))
    return compiled.asm['cubin']
