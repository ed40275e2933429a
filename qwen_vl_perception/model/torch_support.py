"""The one place that imports torch for the core, with a clear message when it is missing."""
import importlib
from typing import Optional


class MissingDependencyError(ImportError):
    """An optional heavy dependency (torch, transformers, bitsandbytes, ...) is not installed."""


def require(module_name: str, purpose: str):
    """Import ``module_name`` or raise :class:`MissingDependencyError` naming ``purpose``."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise MissingDependencyError(
            f'{module_name} is needed {purpose} but is not importable ({error}). '
            'Run tools/setup_env.sh, or pip install -r tools/env/requirements.txt (torch: your '
            'own build, or tools/env/requirements-torch.txt).'
        ) from error


MIN_TORCH = (2, 6)
"""transformers 5 treats an older torch as absent (bitsandbytes 0.50 needs 2.4)."""


def torch_version_problem(version: str) -> Optional[str]:
    """Why torch ``version`` (e.g. ``2.8.0a0+nv25.6``) cannot run the model, or None."""
    parts = []
    for part in version.split('+')[0].split('.')[:2]:
        digits = ''.join(char for char in part if char.isdigit()) if part else ''
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_TORCH:
        return (f'torch {version} is too old: transformers 5 needs torch '
                f'{".".join(map(str, MIN_TORCH))} or newer (it treats an older one as absent)')
    return None


def require_torch():
    """Return the torch module, or fail with a message that says how to install it."""
    torch = require('torch', 'to run the Qwen3-VL model')
    problem = torch_version_problem(torch.__version__)
    if problem:
        raise MissingDependencyError(f'{problem}; install a newer torch (on a Jetson, a '
                                     "newer NVIDIA wheel for your JetPack)")
    return torch


def triton_missing_reason() -> Optional[str]:
    """None when Triton imports, else why not. torch.compile's CUDA code and the fused NF4
    kernel are Triton; JetPack's torch may come without it, and then both stay off."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a Triton that fails while importing
        return f'Triton is not importable ({type(error).__name__}: {error})'
    return None


def release_cuda_memory(torch, library_workspaces: bool) -> None:
    """Give the caching allocator's unused GPU blocks back to the driver (nothing, and no CUDA
    start-up, in a process that has not used CUDA).

    With ``library_workspaces`` also drop cuBLAS's workspaces, which torch keeps per (handle,
    stream) for the process's lifetime: 32 MB each on Hopper, one for every stream that ran a
    matmul (the default stream, the decoder's warm-up stream, the graph-capture stream), about
    100 MB after the first frames. Only safe when no kept CUDA graph captured a cuBLAS call:
    a graph replays with the workspace address it was captured with
    (``cuda_graphs.library_workspaces_unused``, under ``cuda_graphs.LOCK``).
    """
    if not torch.cuda.is_initialized():
        return
    if library_workspaces:
        torch.cuda.synchronize()
        clear = getattr(torch._C, '_cuda_clearCublasWorkspaces', None)  # what inductor calls
        if clear is not None:
            clear()
    torch.cuda.empty_cache()
