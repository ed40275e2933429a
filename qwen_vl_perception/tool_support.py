"""Small helpers shared by the command-line tools in ``tools/``: output folders, name lists,
byte sizes and the one-line error convention (exit code 2, no traceback)."""
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

USAGE_ERROR = 2
"""Exit code of a tool for a usage or input error (argparse uses the same)."""

MODEL_WEIGHT_PATTERNS = ('*.safetensors', '*.safetensors.index.json', 'pytorch_model*.bin',
                         'pytorch_model*.bin.index.json')
"""Files of an old checkpoint that must go before new weights are written into its folder:
a stale shard or index would otherwise be loaded together with the new weights."""


class ToolError(Exception):
    """An expected failure of a tool (bad input, missing model, refused operation).

    Tools print it as one ``error: ...`` line and exit with :data:`USAGE_ERROR`.
    """


def quiet_library_logs() -> None:
    """Hide a bitsandbytes start-up warning that is noise for these tools.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 looks for an optional kernel that the
    ``kernels`` package would download from a model hub, and logs a warning asking to install
    it; the built-in CPU kernel works without it.
    """
    logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.ERROR)


def fail(message: str) -> int:
    """Print ``error: message`` to stderr and return :data:`USAGE_ERROR`."""
    print(f'error: {message}', file=sys.stderr)
    return USAGE_ERROR


def run_tool(run, args, expected=(), check_failures=()) -> int:
    """Run a tool's ``run(args)``: expected failures (``ToolError`` and the ``expected``
    exception types) print one ``error:`` line and give :data:`USAGE_ERROR`; a failed
    self-check (``check_failures``) gives 1. Anything else is a bug and keeps its traceback."""
    quiet_library_logs()
    try:
        return run(args)
    except tuple(check_failures) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except (ToolError, *expected) as error:
        return fail(str(error))


def prepare_output_dir(path: PathLike, overwrite: bool,
                       inputs: Sequence[PathLike] = (),
                       stale_patterns: Sequence[str] = ()) -> Path:
    """Check and create a tool's output folder; return it.

    A folder that exists and is not empty is refused unless ``overwrite``; with it, the files
    matching ``stale_patterns`` (e.g. :data:`MODEL_WEIGHT_PATTERNS`) are deleted first and the
    others are replaced as the tool writes them. The output may not be, contain or lie inside
    any of ``inputs`` (a tool must not write over what it reads).
    """
    out = Path(path)
    resolved = out.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ToolError(f'the output folder {out} overlaps the input {source}; '
                            'write the result somewhere else')
    if out.exists() and not out.is_dir():
        raise ToolError(f'{out} exists and is not a folder')
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ToolError(f'{out} exists and is not empty (pass --overwrite to write into it)')
        for pattern in stale_patterns:
            for stale in out.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def split_names(values: Optional[Iterable[str]]) -> Optional[List[str]]:
    """Flatten ``['cup,table', 'garbage can']`` into ``['cup', 'table', 'garbage can']``.

    Lets a list option take names both space- and comma-separated; ``None`` stays ``None``.
    """
    if values is None:
        return None
    names = []
    for value in values:
        names.extend(part.strip() for part in str(value).split(',') if part.strip())
    return names


def folder_bytes(path: PathLike, patterns: Sequence[str] = ('*',)) -> int:
    """Total size of the files in ``path`` (not recursive) matching any of ``patterns``."""
    path = Path(path)
    files = {file for pattern in patterns for file in path.glob(pattern) if file.is_file()}
    return sum(file.stat().st_size for file in files)


def format_bytes(count: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units, as ``du --si`` and model hubs show)."""
    count = float(count)
    for unit in ('B', 'kB', 'MB', 'GB'):
        if abs(count) < 1000 or unit == 'GB':
            return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.2f} {unit}'
        count /= 1000
    return f'{count:.2f} GB'  # pragma: no cover (loop always returns)
