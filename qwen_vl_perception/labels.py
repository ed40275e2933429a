"""Ground-truth label files (COCO, YOLO, LabelMe) and the per-image prediction JSON.

Every reader returns :class:`LabeledImage` records with boxes ``(x1, y1, x2, y2)`` in source
pixels (continuous coordinates: a box covering pixel columns 3..9 is ``x1=3, x2=10``).
Malformed files raise :class:`ValueError` naming the file and the problem.

Layouts understood (``load_labels`` picks one with ``format='auto'``):

* **COCO**: one JSON file with ``images``, ``annotations`` (``bbox = [x, y, w, h]``) and
  ``categories``. An annotation's optional ``attributes`` dict (as CVAT exports it) becomes the
  object's attributes. ``iscrowd=1`` annotations are skipped (crowd regions are not objects).
* **YOLO**: a dataset root holding ``data.yaml`` (``names`` as a list or ``{id: name}``) or
  ``classes.txt``; images under ``images/`` (or the ``train``/``val``/``test`` folders the
  YAML names) and one ``labels/<stem>.txt`` per image (Ultralytics' ``/images/`` ->
  ``/labels/`` rule; a ``.txt`` beside the image also works) with ``class cx cy w h``
  normalised lines. Image sizes are read from the image files. YOLO has no attributes.
* **LabelMe**: one JSON per image (``shapes``, ``imagePath``, ``imageWidth``,
  ``imageHeight``). Only ``rectangle`` shapes are objects; other shape types are skipped.
  Attributes are merged from, in increasing priority: the shape's boolean ``flags`` (a flag
  named ``key=value`` that is true gives ``{key: value}``; any other flag gives
  ``{name: "true"|"false"}``), ``key=value`` pairs in its ``description`` (separated by
  ``,``, ``;`` or new lines; free text is ignored) and an ``attributes`` dict on the shape
  (LabelMe keeps unknown shape keys when it saves). The writer fills ``attributes`` and
  ``description``.

Prediction files (one JSON per image, written by the detect-folder tool and the node's
end-to-end test)::

    {"image": "frame_0001.png", "width": 640, "height": 480,
     "detections": [{"id": "0", "label": "cup", "box": [x1, y1, x2, y2], "score": 0.93,
                     "attributes": {"color": "red"}}]}
"""
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from qwen_vl_perception.detection import Box, Detection

PathLike = Union[str, os.PathLike]

FORMATS = ('coco', 'yolo', 'labelme')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
YOLO_YAML_NAMES = ('data.yaml', 'dataset.yaml', 'data.yml', 'dataset.yml')
YOLO_CLASS_FILES = ('classes.txt', 'obj.names')
LABELME_VERSION = '5.5.0'
_COORD_TOLERANCE = 1e-6


@dataclass
class GroundTruthObject:
    """One labelled object: category name, pixel box and string attributes."""

    label: str
    box: Box
    attributes: Dict[str, str] = field(default_factory=dict)


@dataclass
class LabeledImage:
    """An image file, its size in pixels and its labelled objects."""

    image_path: str
    width: int
    height: int
    objects: List[GroundTruthObject] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The image's file name (what images are matched by)."""
        return os.path.basename(self.image_path)


# --------------------------------------------------------------------------------------------
# Small helpers


def _read_json(path: Path):
    try:
        with open(path, encoding='utf-8') as stream:
            return json.load(stream)
    except json.JSONDecodeError as error:
        raise ValueError(f'{path}: not valid JSON ({error})') from error
    except UnicodeDecodeError as error:
        raise ValueError(f'{path}: not UTF-8 text ({error})') from error


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as stream:
        json.dump(data, stream, indent=2)
        stream.write('\n')


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _attributes_as_strings(raw, where: str) -> Dict[str, str]:
    """Turn a JSON attributes dict into ``{str: str}`` (booleans become "true"/"false")."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f'{where}: attributes must be an object, got {type(raw).__name__}')
    result = {}
    for key, value in raw.items():
        if isinstance(value, bool):
            value = 'true' if value else 'false'
        elif value is None:
            continue
        elif isinstance(value, (dict, list)):
            raise ValueError(f'{where}: attribute {key!r} must be a string or number')
        result[str(key)] = str(value)
    return result


def _checked_box(values, where: str) -> Box:
    """Validate an ``(x1, y1, x2, y2)`` list of four finite numbers with x1<=x2, y1<=y2."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        raise ValueError(f'{where}: a box must be 4 numbers, got {values!r}')
    if not all(_is_number(v) for v in values):
        raise ValueError(f'{where}: box values must be finite numbers, got {values!r}')
    x1, y1, x2, y2 = (float(v) for v in values)
    if x2 < x1 or y2 < y1:
        raise ValueError(f'{where}: box {values!r} has x2 < x1 or y2 < y1')
    return x1, y1, x2, y2


def _positive_int(value, where: str, name: str) -> int:
    if not _is_number(value) or value <= 0 or int(value) != value:
        raise ValueError(f'{where}: {name} must be a positive integer, got {value!r}')
    return int(value)


def image_size(path: PathLike) -> Tuple[int, int]:
    """Return ``(width, height)`` of an image file (header only where Pillow is available)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'{path}: image file not found')
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(path) as image:
                return int(image.width), int(image.height)
        except Exception as error:  # Pillow raises many types for unreadable files
            raise ValueError(f'{path}: cannot read image ({error})') from error
    import cv2
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f'{path}: cannot read image')
    return int(image.shape[1]), int(image.shape[0])


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _sorted_categories(images: Iterable[LabeledImage],
                       categories: Optional[Sequence[str]]) -> List[str]:
    present = sorted({obj.label for image in images for obj in image.objects})
    if categories is None:
        return present
    missing = [name for name in present if name not in categories]
    if missing:
        raise ValueError(f'labels {missing} are not in the given categories {list(categories)}')
    return list(categories)


# --------------------------------------------------------------------------------------------
# Predictions


def detections_to_json(image_name: str, width: int, height: int,
                       detections: Sequence[Detection]) -> dict:
    """Return the prediction-file dict for one image (see the module docstring)."""
    return {
        'image': image_name,
        'width': int(width),
        'height': int(height),
        'detections': [
            {
                'id': str(det.id),
                'label': det.label,
                'box': [float(v) for v in det.box],
                'score': float(det.score),
                'attributes': {str(k): str(v) for k, v in det.attributes.items()},
            }
            for det in detections
        ],
    }


def _require_keys(item, where: str, keys) -> None:
    """ValueError naming ``where`` unless ``item`` is a dict holding every key of ``keys``."""
    if not isinstance(item, dict):
        raise ValueError(f'{where}: expected an object')
    for key in keys:
        if key not in item:
            raise ValueError(f'{where}: missing key {key!r}')


def detections_from_json(data: dict, source: str = 'predictions'
                         ) -> Tuple[str, int, int, List[Detection]]:
    """Parse a prediction-file dict into ``(image_name, width, height, detections)``.

    ``source`` names the origin (a file path) in error messages.
    """
    if not isinstance(data, dict):
        raise ValueError(f'{source}: expected a JSON object, got {type(data).__name__}')
    for key in ('image', 'width', 'height', 'detections'):
        if key not in data:
            raise ValueError(f'{source}: missing key {key!r}')
    image_name = data['image']
    if not isinstance(image_name, str) or not image_name:
        raise ValueError(f'{source}: "image" must be a non-empty file name')
    width = _positive_int(data['width'], source, 'width')
    height = _positive_int(data['height'], source, 'height')
    if not isinstance(data['detections'], list):
        raise ValueError(f'{source}: "detections" must be a list')
    detections = []
    for index, item in enumerate(data['detections']):
        where = f'{source}: detection {index}'
        _require_keys(item, where, ('label', 'box', 'score'))
        if not isinstance(item['label'], str) or not item['label']:
            raise ValueError(f'{where}: "label" must be a non-empty string')
        if not _is_number(item['score']):
            raise ValueError(f'{where}: "score" must be a finite number')
        detections.append(Detection(
            label=item['label'],
            box=_checked_box(item['box'], where),
            score=float(item['score']),
            attributes=_attributes_as_strings(item.get('attributes'), where),
            id=str(item.get('id', index)),
        ))
    return image_name, width, height, detections


def write_prediction_file(path: PathLike, image_name: str, width: int, height: int,
                          detections: Sequence[Detection]) -> None:
    """Write one image's predictions as JSON to ``path``."""
    _write_json(Path(path), detections_to_json(image_name, width, height, detections))


def load_predictions(directory: PathLike) -> Dict[str, List[Detection]]:
    """Read every ``*.json`` prediction file in ``directory`` into ``{image name: detections}``.

    Keys are file names (basenames). JSON objects without both ``image`` and ``detections``
    keys are skipped with a warning (e.g. a summary file); a malformed prediction file or two
    files for the same image raise :class:`ValueError`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f'{directory}: predictions folder not found')
    predictions: Dict[str, List[Detection]] = {}
    sources: Dict[str, Path] = {}
    for path in sorted(directory.glob('*.json')):
        data = _read_json(path)
        if not (isinstance(data, dict) and 'image' in data and 'detections' in data):
            warnings.warn(f'{path}: not a prediction file (no "image"/"detections"), skipped')
            continue
        image_name, _, _, detections = detections_from_json(data, str(path))
        name = os.path.basename(image_name)
        if name in predictions:
            raise ValueError(f'{path}: predictions for {name!r} were already read from '
                             f'{sources[name]}')
        predictions[name] = detections
        sources[name] = path
    return predictions


# --------------------------------------------------------------------------------------------
# COCO


def _find_image(base: Path, file_name: str) -> Path:
    """Resolve a COCO ``file_name``: beside the JSON, in ``images/`` or ``../images/``."""
    candidates = [base / file_name, base / 'images' / file_name,
                  base.parent / 'images' / file_name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def read_coco(path: PathLike) -> List[LabeledImage]:
    """Read a COCO detection JSON file."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f'{path}: a COCO file must be a JSON object')
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data.get(key), list):
            raise ValueError(f'{path}: COCO key {key!r} missing or not a list')
    categories = {}
    for index, category in enumerate(data['categories']):
        if not isinstance(category, dict) or 'id' not in category or 'name' not in category:
            raise ValueError(f'{path}: categories[{index}] needs "id" and "name"')
        categories[category['id']] = str(category['name'])
    images: Dict[object, LabeledImage] = {}
    for index, entry in enumerate(data['images']):
        where = f'{path}: images[{index}]'
        _require_keys(entry, where, ('id', 'file_name', 'width', 'height'))
        if entry['id'] in images:
            raise ValueError(f'{where}: duplicate image id {entry["id"]!r}')
        images[entry['id']] = LabeledImage(
            image_path=str(_find_image(path.parent, str(entry['file_name']))),
            width=_positive_int(entry['width'], where, 'width'),
            height=_positive_int(entry['height'], where, 'height'),
        )
    for index, annotation in enumerate(data['annotations']):
        where = f'{path}: annotations[{index}]'
        _require_keys(annotation, where, ('image_id', 'category_id', 'bbox'))
        if annotation.get('iscrowd', 0):
            continue
        if annotation['image_id'] not in images:
            raise ValueError(f'{where}: unknown image_id {annotation["image_id"]!r}')
        if annotation['category_id'] not in categories:
            raise ValueError(f'{where}: unknown category_id {annotation["category_id"]!r}')
        bbox = annotation['bbox']
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(_is_number(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0):
            raise ValueError(f'{where}: bbox must be [x, y, w, h] with w, h >= 0, got {bbox!r}')
        x, y, w, h = (float(v) for v in bbox)
        images[annotation['image_id']].objects.append(GroundTruthObject(
            label=categories[annotation['category_id']],
            box=(x, y, x + w, y + h),
            attributes=_attributes_as_strings(annotation.get('attributes'), where),
        ))
    return list(images.values())


def write_coco(images: Sequence[LabeledImage], path: PathLike,
               categories: Optional[Sequence[str]] = None) -> None:
    """Write ``images`` as a COCO JSON; ``file_name`` is relative to the JSON's folder."""
    path = Path(path)
    names = _sorted_categories(images, categories)
    category_ids = {name: index + 1 for index, name in enumerate(names)}
    coco_images, annotations = [], []
    for image_id, image in enumerate(images, start=1):
        coco_images.append({'id': image_id,
                            'file_name': _relative(Path(image.image_path), path.parent),
                            'width': image.width, 'height': image.height})
        for obj in image.objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({
                'id': len(annotations) + 1, 'image_id': image_id,
                'category_id': category_ids[obj.label],
                'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
                'iscrowd': 0, 'attributes': dict(obj.attributes),
            })
    _write_json(path, {
        'images': coco_images, 'annotations': annotations,
        'categories': [{'id': cid, 'name': name, 'supercategory': 'object'}
                       for name, cid in category_ids.items()],
    })


# --------------------------------------------------------------------------------------------
# YOLO


def _load_yaml(path: Path):
    import yaml
    try:
        with open(path, encoding='utf-8') as stream:
            return yaml.safe_load(stream)
    except yaml.YAMLError as error:
        raise ValueError(f'{path}: not valid YAML ({error})') from error


def _yolo_names_from_yaml(path: Path, data) -> List[str]:
    if not isinstance(data, dict) or 'names' not in data:
        raise ValueError(f'{path}: YOLO data YAML needs a "names" list or mapping')
    names = data['names']
    if isinstance(names, dict):
        try:
            keys = sorted(int(key) for key in names)
        except (TypeError, ValueError) as error:
            raise ValueError(f'{path}: "names" keys must be class ids') from error
        if keys != list(range(len(keys))):
            raise ValueError(f'{path}: "names" ids must be 0..{len(keys) - 1}, got {keys}')
        lookup = {int(key): value for key, value in names.items()}
        names = [lookup[key] for key in keys]
    if not isinstance(names, list) or not names:
        raise ValueError(f'{path}: "names" must be a non-empty list or mapping')
    return [str(name) for name in names]


def _yolo_names_from_text(path: Path) -> List[str]:
    lines = path.read_text(encoding='utf-8').splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise ValueError(f'{path}: no class names')
    if '' in names:
        raise ValueError(f'{path}: empty class name on line {names.index("") + 1}')
    return names


def _yolo_root_files(root: Path) -> Tuple[Optional[Path], Optional[Path]]:
    yaml_file = next((root / n for n in YOLO_YAML_NAMES if (root / n).is_file()), None)
    class_file = next((root / n for n in YOLO_CLASS_FILES if (root / n).is_file()), None)
    return yaml_file, class_file


def _images_under(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob('*')
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _yolo_image_files(root: Path, yaml_file: Optional[Path], yaml_data) -> List[Path]:
    """Images named by the YAML's train/val/test entries, else under images/, else root."""
    found: List[Path] = []
    if yaml_file is not None and isinstance(yaml_data, dict):
        # Split entries are relative to the YAML's folder; an absolute "path" key overrides
        # it (Ultralytics resolves a relative one against its own datasets folder).
        base = root
        if isinstance(yaml_data.get('path'), str) and Path(yaml_data['path']).is_absolute():
            base = Path(yaml_data['path'])
        for split in ('train', 'val', 'test'):
            entries = yaml_data.get(split)
            entries = [entries] if isinstance(entries, str) else entries or []
            for entry in entries:
                target = base / str(entry)
                if target.is_dir():
                    found.extend(_images_under(target))
                elif target.is_file() and target.suffix == '.txt':
                    for line in target.read_text(encoding='utf-8').splitlines():
                        if line.strip():
                            found.append((target.parent / line.strip()).resolve())
    if not found:
        found = _images_under(root / 'images' if (root / 'images').is_dir() else root)
    unique = []
    seen = set()
    for image in found:
        key = image.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(image)
    return unique


def yolo_label_path(image_path: PathLike) -> Path:
    """Ultralytics' rule: the last ``images`` folder becomes ``labels``, suffix ``.txt``.

    An image outside any ``images`` folder keeps its label file beside it.
    """
    image_path = Path(image_path)
    parts = list(image_path.parts)
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == 'images':
            parts[index] = 'labels'
            return Path(*parts).with_suffix('.txt')
    return image_path.with_suffix('.txt')


def _read_yolo_label_file(path: Path, names: List[str], width: int, height: int
                          ) -> List[GroundTruthObject]:
    objects = []
    for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f'{path}:{number}'
        if len(fields) != 5:
            raise ValueError(f'{where}: expected "class cx cy w h", got {len(fields)} fields')
        try:
            class_id = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError as error:
            raise ValueError(f'{where}: not numbers: {line.strip()!r}') from error
        if not 0 <= class_id < len(names):
            raise ValueError(f'{where}: class {class_id} outside 0..{len(names) - 1}')
        values = (cx, cy, w, h)
        if not all(math.isfinite(v) and -_COORD_TOLERANCE <= v <= 1 + _COORD_TOLERANCE
                   for v in values):
            raise ValueError(f'{where}: coordinates must be normalised to [0, 1]: '
                             f'{line.strip()!r}')
        x1 = max(0.0, (cx - w / 2) * width)
        y1 = max(0.0, (cy - h / 2) * height)
        x2 = min(float(width), (cx + w / 2) * width)
        y2 = min(float(height), (cy + h / 2) * height)
        objects.append(GroundTruthObject(names[class_id], (x1, y1, max(x1, x2), max(y1, y2))))
    return objects


def read_yolo(path: PathLike) -> List[LabeledImage]:
    """Read a YOLO dataset: its root folder, its data YAML or its classes.txt."""
    path = Path(path)
    if path.is_file():
        root = path.parent
        is_yaml = path.suffix.lower() in ('.yaml', '.yml')
        yaml_file = path if is_yaml else None
        class_file = None if is_yaml else path
    elif path.is_dir():
        root = path
        yaml_file, class_file = _yolo_root_files(root)
        if yaml_file is None and class_file is None:
            raise ValueError(f'{path}: no {" / ".join(YOLO_YAML_NAMES + YOLO_CLASS_FILES)} '
                             'with class names in this YOLO folder')
    else:
        raise ValueError(f'{path}: not found')
    yaml_data = _load_yaml(yaml_file) if yaml_file is not None else None
    if yaml_file is not None:
        names = _yolo_names_from_yaml(yaml_file, yaml_data)
    else:
        names = _yolo_names_from_text(class_file)
    images = []
    for image_path in _yolo_image_files(root, yaml_file, yaml_data):
        width, height = image_size(image_path)
        label_path = yolo_label_path(image_path)
        if not label_path.is_file():
            label_path = image_path.with_suffix('.txt')
        objects = (_read_yolo_label_file(label_path, names, width, height)
                   if label_path.is_file() else [])
        images.append(LabeledImage(str(image_path), width, height, objects))
    if not images:
        raise ValueError(f'{path}: no image files found for this YOLO dataset')
    return images


def write_yolo(images: Sequence[LabeledImage], root: PathLike,
               categories: Optional[Sequence[str]] = None) -> None:
    """Write YOLO labels for ``images`` plus ``classes.txt`` and ``data.yaml`` in ``root``.

    Each label file goes where :func:`yolo_label_path` says (``images/x.png`` ->
    ``labels/x.txt``). Attributes are not stored (YOLO has no place for them).
    """
    root = Path(root)
    names = _sorted_categories(images, categories)
    class_ids = {name: index for index, name in enumerate(names)}
    root.mkdir(parents=True, exist_ok=True)
    for image in images:
        lines = []
        for obj in image.objects:
            x1, y1, x2, y2 = obj.box
            lines.append('%d %.6f %.6f %.6f %.6f' % (
                class_ids[obj.label], (x1 + x2) / 2 / image.width,
                (y1 + y2) / 2 / image.height, (x2 - x1) / image.width,
                (y2 - y1) / image.height))
        label_path = yolo_label_path(image.image_path)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    (root / 'classes.txt').write_text(''.join(n + '\n' for n in names), encoding='utf-8')
    image_dirs = sorted({_relative(Path(image.image_path).parent, root) for image in images})
    split = image_dirs[0] if len(image_dirs) == 1 else 'images'
    yaml_lines = [f'train: {split}', f'val: {split}', f'nc: {len(names)}', 'names:']
    yaml_lines += [f'  - {json.dumps(name)}' for name in names]
    (root / 'data.yaml').write_text('\n'.join(yaml_lines) + '\n', encoding='utf-8')


# --------------------------------------------------------------------------------------------
# LabelMe

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


# --------------------------------------------------------------------------------------------
# Format detection and the one entry point


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
