"""YOLO datasets: data.yaml or classes.txt, images/ and one labels/<stem>.txt per image."""
import json
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .records import (GroundTruthObject, IMAGE_EXTENSIONS, LabeledImage, PathLike,
                      YOLO_CLASS_FILES, YOLO_YAML_NAMES, _COORD_TOLERANCE, _read_text_data,
                      _relative, _sorted_categories, image_size)


def _load_yaml(path: Path):
    import yaml
    return _read_text_data(path, yaml.safe_load, yaml.YAMLError, 'YAML')


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
