"""LabelMe label files: one JSON per image; rectangles are objects."""
import re
from pathlib import Path
from typing import Dict, List

from .records import (GroundTruthObject, LABELME_VERSION, LabeledImage, PathLike,
                      _attributes_as_strings, _is_number, _positive_int, _read_json, _relative,
                      _write_json, image_size)


_PAIR_SEPARATORS = re.compile(r'[,;\n]')


def _labelme_attributes(shape: dict, where: str) -> Dict[str, str]:
    attributes: Dict[str, str] = {}
    flags = shape.get('flags') or {}
    if not isinstance(flags, dict):
        raise ValueError(f'{where}: "flags" must be an object')
    for name, value in flags.items():
        key, sep, flag_value = str(name).replace(':', '=', 1).partition('=')
        if sep:
            if value:
                attributes[key.strip()] = flag_value.strip()
        else:
            attributes[str(name)] = 'true' if value else 'false'
    description = shape.get('description')
    if isinstance(description, str):
        for piece in _PAIR_SEPARATORS.split(description):
            key, sep, value = piece.replace(':', '=', 1).partition('=')
            if sep and key.strip() and value.strip():
                attributes[key.strip()] = value.strip()
    attributes.update(_attributes_as_strings(shape.get('attributes'), where))
    return attributes


def read_labelme_file(path: PathLike) -> LabeledImage:
    """Read one LabelMe JSON file (rectangle shapes only)."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get('shapes'), list):
        raise ValueError(f'{path}: a LabelMe file needs a "shapes" list')
    if not isinstance(data.get('imagePath'), str) or not data['imagePath']:
        raise ValueError(f'{path}: a LabelMe file needs "imagePath"')
    image_path = path.parent / data['imagePath'].replace('\\', '/')
    if data.get('imageWidth') is not None and data.get('imageHeight') is not None:
        width = _positive_int(data['imageWidth'], str(path), 'imageWidth')
        height = _positive_int(data['imageHeight'], str(path), 'imageHeight')
    else:
        width, height = image_size(image_path)
    objects = []
    for index, shape in enumerate(data['shapes']):
        where = f'{path}: shapes[{index}]'
        if not isinstance(shape, dict):
            raise ValueError(f'{where}: expected an object')
        if shape.get('shape_type', 'polygon') != 'rectangle':
            continue
        label = shape.get('label')
        if not isinstance(label, str) or not label:
            raise ValueError(f'{where}: "label" must be a non-empty string')
        points = shape.get('points')
        if (not isinstance(points, list) or len(points) < 2
                or not all(isinstance(p, list) and len(p) == 2
                           and all(_is_number(v) for v in p) for p in points)):
            raise ValueError(f'{where}: a rectangle needs 2 [x, y] points, got {points!r}')
        xs = [float(p[0]) for p in points]
        ys = [float(p[1]) for p in points]
        objects.append(GroundTruthObject(label, (min(xs), min(ys), max(xs), max(ys)),
                                         _labelme_attributes(shape, where)))
    return LabeledImage(str(image_path), width, height, objects)


def _labelme_files(folder: Path) -> List[Path]:
    """JSON files under ``folder`` that look like LabelMe documents (have ``shapes``)."""
    files = []
    for path in sorted(folder.rglob('*.json')):
        data = _read_json(path)
        if isinstance(data, dict) and 'shapes' in data:
            files.append(path)
    return files


def read_labelme(path: PathLike) -> List[LabeledImage]:
    """Read a LabelMe JSON file, or every LabelMe JSON under a folder (recursively)."""
    path = Path(path)
    if path.is_file():
        return [read_labelme_file(path)]
    if not path.is_dir():
        raise ValueError(f'{path}: not found')
    files = _labelme_files(path)
    if not files:
        raise ValueError(f'{path}: no LabelMe JSON files (with "shapes") in this folder')
    return [read_labelme_file(file) for file in files]


def write_labelme(image: LabeledImage, path: PathLike) -> None:
    """Write one image's objects as a LabelMe JSON (``imagePath`` relative to it)."""
    path = Path(path)
    shapes = []
    for obj in image.objects:
        x1, y1, x2, y2 = obj.box
        shapes.append({
            'label': obj.label, 'points': [[x1, y1], [x2, y2]], 'group_id': None,
            'description': ', '.join(f'{k}={v}' for k, v in obj.attributes.items()),
            'shape_type': 'rectangle', 'flags': {}, 'mask': None,
            'attributes': dict(obj.attributes),
        })
    _write_json(path, {
        'version': LABELME_VERSION, 'flags': {}, 'shapes': shapes,
        'imagePath': _relative(Path(image.image_path), path.parent), 'imageData': None,
        'imageHeight': image.height, 'imageWidth': image.width,
    })
