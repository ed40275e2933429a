"""Label records (images, objects), label-file constants and the helpers the readers share."""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from qwen_vl_perception.detection import Box


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


def _read_text_data(path: Path, load, parse_errors, kind: str):
    """``load(stream)`` of a UTF-8 file; its parse errors become one ValueError naming it."""
    try:
        with open(path, encoding='utf-8') as stream:
            return load(stream)
    except parse_errors as error:
        raise ValueError(f'{path}: not valid {kind} ({error})') from error
    except UnicodeDecodeError as error:
        raise ValueError(f'{path}: not UTF-8 text ({error})') from error


def _read_json(path: Path):
    return _read_text_data(path, json.load, json.JSONDecodeError, 'JSON')


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


def _require_keys(item, where: str, keys) -> None:
    """ValueError naming ``where`` unless ``item`` is a dict holding every key of ``keys``."""
    if not isinstance(item, dict):
        raise ValueError(f'{where}: expected an object')
    for key in keys:
        if key not in item:
            raise ValueError(f'{where}: missing key {key!r}')
