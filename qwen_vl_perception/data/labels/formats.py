"""Which label format a path holds, and the one entry point that reads any of them."""
from pathlib import Path
from typing import List

from .records import FORMATS, LabeledImage, PathLike, YOLO_CLASS_FILES, _read_json
from .coco import read_coco
from .yolo import _yolo_root_files, read_yolo
from .labelme import _labelme_files, read_labelme


def _is_coco_json(path: Path) -> bool:
    data = _read_json(path)
    return isinstance(data, dict) and 'images' in data and 'annotations' in data


def detect_format(path: PathLike) -> str:
    """Guess the label format of a file or folder; ValueError when none or several fit."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f'{path}: not found')
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in ('.yaml', '.yml') or path.name in YOLO_CLASS_FILES:
            return 'yolo'
        if suffix != '.json':
            raise ValueError(f'{path}: cannot tell the label format of this file '
                             '(expected a COCO/LabelMe .json, a YOLO data.yaml or classes.txt)')
        data = _read_json(path)
        if isinstance(data, dict) and 'images' in data and 'annotations' in data:
            return 'coco'
        if isinstance(data, dict) and 'shapes' in data:
            return 'labelme'
        raise ValueError(f'{path}: JSON is neither COCO (images/annotations) '
                         'nor LabelMe (shapes)')
    found = {}
    coco_files = [p for folder in (path, path / 'annotations') if folder.is_dir()
                  for p in sorted(folder.glob('*.json')) if _is_coco_json(p)]
    if len(coco_files) > 1:
        raise ValueError(f'{path}: several COCO files ({", ".join(p.name for p in coco_files)})'
                         '; pass one of them')
    if coco_files:
        found['coco'] = coco_files[0].name
    yaml_file, class_file = _yolo_root_files(path)
    if yaml_file or class_file:
        found['yolo'] = (yaml_file or class_file).name
    labelme_files = _labelme_files(path)
    if labelme_files:
        found['labelme'] = f'{len(labelme_files)} JSON files with "shapes"'
    if not found:
        raise ValueError(f'{path}: no COCO JSON, YOLO data.yaml/classes.txt or LabelMe JSON '
                         'found')
    if len(found) > 1:
        listing = '; '.join(f'{fmt} ({why})' for fmt, why in found.items())
        raise ValueError(f'{path}: several label formats found: {listing}; pass format= '
                         '(--format) or a more specific path')
    return next(iter(found))


def load_labels(path: PathLike, format: str = 'auto') -> List[LabeledImage]:
    """Read ground truth from ``path`` in ``format`` (coco, yolo, labelme or auto).

    ``path`` is a COCO JSON file (or a folder holding exactly one), a YOLO dataset root (or its
    data.yaml / classes.txt), or a LabelMe JSON file or folder of them.
    """
    if format == 'auto':
        format = detect_format(path)
    path = Path(path)
    if format == 'coco':
        if path.is_dir():
            files = [p for folder in (path, path / 'annotations') if folder.is_dir()
                     for p in sorted(folder.glob('*.json')) if _is_coco_json(p)]
            if len(files) != 1:
                raise ValueError(f'{path}: expected one COCO JSON in this folder, found '
                                 f'{len(files)}; pass the file')
            path = files[0]
        if not path.is_file():
            raise ValueError(f'{path}: not found')
        return read_coco(path)
    if format == 'yolo':
        return read_yolo(path)
    if format == 'labelme':
        return read_labelme(path)
    raise ValueError(f'unknown label format {format!r}; expected auto or one of {FORMATS}')
