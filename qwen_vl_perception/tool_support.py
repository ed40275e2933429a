"""Small helpers shared by the command-line tools in ``tools/``: output folders, name lists,
byte sizes and the one-line error convention (exit code 2, no traceback)."""
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from .categories import normalize_categories
from .library_logs import quiet_library_logs, quiet_progress_bars

PathLike = Union[str, os.PathLike]

USAGE_ERROR = 2
"""Exit code of a tool for a usage or input error (argparse uses the same)."""

WEIGHT_PATTERNS = ('*.safetensors', 'pytorch_model*.bin')
"""A checkpoint's weight files (safetensors or PyTorch pickles, one file or shards)."""

MODEL_WEIGHT_PATTERNS = tuple(name for pattern in WEIGHT_PATTERNS
                              for name in (pattern, pattern + '.index.json'))
"""Files of an old checkpoint that must go before new weights are written into its folder:
a stale shard or index would otherwise be loaded together with the new weights."""


class ToolError(Exception):
    """An expected failure of a tool (bad input, missing model, refused operation).

    Tools print it as one ``error: ...`` line and exit with :data:`USAGE_ERROR`.
    """


def fail(message: str) -> int:
    """Print ``error: message`` to stderr and return :data:`USAGE_ERROR`."""
    print(f'error: {message}', file=sys.stderr)
    return USAGE_ERROR


def run_tool(run, args, expected=(), check_failures=()) -> int:
    """Run a tool's ``run(args)``: expected failures (``ToolError`` and the ``expected``
    exception types) print one ``error:`` line and give :data:`USAGE_ERROR`; a failed
    self-check (``check_failures``) gives 1. Anything else is a bug and keeps its traceback."""
    quiet_library_logs()
    quiet_progress_bars()
    _created.clear()
    _removed_links.clear()
    try:
        return run(args)
    except tuple(check_failures) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except (ToolError, *expected) as error:
        remove_created_outputs()
        return fail(str(error))
    except BaseException:
        remove_created_outputs()
        raise
    finally:
        _created.clear()
        _removed_links.clear()


_created: List[Tuple[Path, Optional[set]]] = []
"""Output folders :func:`prepare_output_dir` prepared in this run, each with the names of
the entries it held then (None: the folder, or the outermost folder above it, was made)."""
_removed_links: List[Tuple[Path, str]] = []
"""Symbolic links :func:`prepare_output_dir` took out of an output folder in this run, with
their targets, so that a failed run puts them back."""


def remove_created_outputs() -> None:
    """Undo :func:`prepare_output_dir` after a failed run: remove the folders it created and,
    in a folder that existed, only the entries that were not there before. A folder the user
    had keeps everything it held, the symbolic links taken out of it included.
    :func:`run_tool` calls it when a tool fails."""
    while _created:
        folder, before = _created.pop()
        if not folder.is_dir():
            continue
        if before is None:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for entry in folder.iterdir():
            if entry.name in before:
                continue
            _remove(entry)
    while _removed_links:
        link, target = _removed_links.pop()
        if link.is_symlink() or link.exists():
            _remove(link)
        if link.parent.is_dir():
            link.symlink_to(target)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def unlink_links(folder: PathLike) -> List[Tuple[Path, str]]:
    """Make every entry under ``folder`` the folder's own, so that writing there never goes
    through a link to something elsewhere: symbolic links are removed (what they point to is
    not touched) and a file with other hard links becomes a copy of its own. Returns the
    removed links with their targets. The one rule for every tool that overwrites."""
    removed = []
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            entry = Path(parent) / name
            if entry.is_symlink():
                removed.append((entry, os.readlink(entry)))
                entry.unlink()
            elif name in files and entry.stat().st_nlink > 1:
                copy = entry.with_name(f'.{name}.unlinked')
                shutil.copy2(entry, copy)
                os.replace(copy, entry)
        folders[:] = [name for name in folders if (Path(parent) / name).is_dir()]
    return removed


def prepare_output_dir(path: PathLike, overwrite: bool,
                       inputs: Sequence[PathLike] = (),
                       stale_patterns: Sequence[str] = ()) -> Path:
    """Check and create a tool's output folder; return it.

    A folder that exists and is not empty is refused unless ``overwrite``; with it, the files
    and folders matching ``stale_patterns`` (e.g. :data:`MODEL_WEIGHT_PATTERNS`, or a tool's
    own output folders) are deleted first and the others are replaced as the tool writes them.
    Nothing is written through a link: symbolic links inside the folder are removed first
    (their targets stay as they are) and hard-linked files become files of their own
    (:func:`unlink_links`). The output may not be, contain or lie inside any of ``inputs``
    (a tool must not write over what it reads). What the folder held is recorded, so that a
    failed run under :func:`run_tool` removes only what it created
    (:func:`remove_created_outputs`).
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
    existed = out.is_dir()
    if existed and any(out.iterdir()):
        if not overwrite:
            raise ToolError(f'{out} exists and is not empty (pass --overwrite to write into it)')
        _removed_links.extend(unlink_links(out))  # put back if the run fails
        for pattern in stale_patterns:
            for stale in out.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
    if existed:
        _created.append((resolved, {entry.name for entry in out.iterdir()}))
    else:
        top = resolved  # the outermost folder this call makes (parents included)
        while not top.parent.exists():
            top = top.parent
        _created.append((top, None))
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


def category_names(values: Optional[Iterable[str]],
                   option: str = '--categories') -> Optional[List[str]]:
    """The categories of a tool's ``--categories`` option, checked by the node's rule.

    Names are space- or comma-separated (:func:`split_names`); a value that is empty or blank
    as a whole stays as an empty name, which the node's validator
    (:func:`~qwen_vl_perception.categories.normalize_categories`) refuses with the message
    the node gives for the same parameter value. ``None`` (option not given) stays ``None``.
    """
    if values is None:
        return None
    names: List[str] = []
    for value in values:
        names.extend(split_names([value]) or [str(value)])
    try:
        return normalize_categories(names)
    except ValueError as error:
        raise ToolError(f'invalid {option}: {error}') from None


def format_bytes(count: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units, as ``du --si`` and model hubs show)."""
    count = float(count)
    for unit in ('B', 'kB', 'MB', 'GB'):
        if abs(count) < 1000 or unit == 'GB':
            return f'{count:.0f} {unit}' if unit == 'B' else f'{count:.2f} {unit}'
        count /= 1000
    return f'{count:.2f} GB'  # pragma: no cover (loop always returns)
