"""The images of a folder in natural order (``img2`` before ``img10``), as a person sorts them."""
import os
import re
from pathlib import Path
from typing import List, Tuple, Union

FOLDER_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
"""Image files picked from a folder (compared case-insensitively)."""

_DIGITS = re.compile(r'(\d+)')


def natural_key(name: str) -> Tuple:
    """Sort key: runs of digits compare as numbers, the rest case-insensitively.

    ``['img10.png', 'IMG2.png', 'img1.png']`` sorts as ``img1, IMG2, img10``. Ties between
    names that differ only in case or leading zeros fall back to the exact name, so the order
    is total and the same on every machine.
    """
    parts = []
    for index, piece in enumerate(_DIGITS.split(name)):
        if index % 2:
            parts.append((1, int(piece), ''))
        else:
            parts.append((0, 0, piece.casefold()))
    return tuple(parts), name


def list_images(folder: Union[str, os.PathLike]) -> List[Path]:
    """Image files directly inside ``folder`` (not recursive), in natural order.

    Raises ``NotADirectoryError``/``FileNotFoundError`` for a path that is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f'image folder {folder} does not exist')
    if not folder.is_dir():
        raise NotADirectoryError(f'{folder} is not a folder')
    files = [path for path in folder.iterdir()
             if path.is_file() and path.suffix.lower() in FOLDER_IMAGE_EXTENSIONS]
    return sorted(files, key=lambda path: natural_key(path.name))
