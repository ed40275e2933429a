"""Whether a cached file can be trusted: no one but this user or root can have changed it.

The default model's cache (:mod:`default_model`) and the compiled-kernel cache (:mod:`nvrtc`)
use what they find only when the entry is not a link, belongs to this user or root, is not
writable by group or others, and no folder above it can be changed by other users (a sticky
folder such as ``/tmp`` is fine). Each function returns why not, or None.
"""
import os
import stat
from pathlib import Path
from typing import Optional


def trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def untrusted_entry(path: Path, kind=stat.S_ISREG) -> Optional[str]:
    """Why ``path`` (not followed if a link) is not a trusted ``kind`` entry (``stat.S_ISREG``
    or ``stat.S_ISDIR``), or None."""
    return untrusted_status(path, os.lstat(path), kind)


def untrusted_status(path: Path, info: os.stat_result, kind=stat.S_ISREG) -> Optional[str]:
    """As :func:`untrusted_entry`, from ``info`` (``os.fstat`` of a file opened without
    following links, so that what is checked is what is read)."""
    if not kind(info.st_mode):
        what = 'folder' if kind is stat.S_ISDIR else 'file'
        return f'{path}: not a plain {what} (a link or other entry)'
    if not trusted_owner(info.st_uid):
        return (f'{path} belongs to uid {info.st_uid}, neither this user ({os.geteuid()}) '
                'nor root')
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f'{path} is writable by group or others ({stat.filemode(info.st_mode)})'
    return None


def untrusted_above(folder: Path) -> Optional[str]:
    """Why someone other than the owner or root could swap ``folder`` or a folder above it,
    or None."""
    for path in [folder.resolve(), *folder.resolve().parents]:
        info = os.stat(path)
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if not trusted_owner(info.st_uid) or (writable and not info.st_mode & stat.S_ISVTX):
            return (f'{path} ({stat.filemode(info.st_mode)}, uid {info.st_uid}) can be changed '
                    'by other users')
    return None


def make_folders(folder: Path, mode: int = 0o755) -> None:
    """Make ``folder`` and the folders above it that are missing, each with ``mode`` whatever
    the umask (``mkdir(parents=True)`` leaves the umask's to all but the last: a umask of 002
    would make folders that the checks above then refuse)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made meanwhile by someone else: the checks decide
            continue
        path.chmod(mode)
