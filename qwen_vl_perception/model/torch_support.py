"""The one place that imports torch for the core, with a clear message when it is missing."""
import importlib


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
