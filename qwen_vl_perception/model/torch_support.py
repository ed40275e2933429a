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
            'Run tools/setup_env.sh, or pip install -r tools/env/requirements.txt.'
        ) from error


def require_torch():
    """Return the torch module, or fail with a message that says how to install it."""
    return require('torch', 'to run the Qwen3-VL model')


def triton_missing_reason() -> Optional[str]:
    """None when Triton imports, else why not. torch.compile's CUDA code and the fused NF4
    kernel are Triton; JetPack's torch may come without it, and then both stay off."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a Triton that fails while importing
        return f'Triton is not importable ({type(error).__name__}: {error})'
    return None
