"""COCO label files: one JSON with images, annotations and categories."""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .records import (GroundTruthObject, LabeledImage, PathLike, _attributes_as_strings,
                      _is_number, _positive_int, _read_json, _relative, _require_keys,
                      _sorted_categories, _write_json)


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
