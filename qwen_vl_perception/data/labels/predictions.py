"""The per-image prediction JSON written by the detect-folder tool and read by evaluate."""
import os
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from qwen_vl_perception.detection import Detection
from .records import (PathLike, _attributes_as_strings, _checked_box, _is_number, _positive_int,
                      _read_json, _require_keys, _write_json)


def detections_to_json(image_name: str, width: int, height: int,
                       detections: Sequence[Detection]) -> dict:
    """Return the prediction-file dict for one image (see the package docstring)."""
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


PREDICTIONS_DIR = 'predictions'
"""The sub-folder of a detection run folder (``tools/detect_folder.py --out``) holding one
prediction file per image."""


def predictions_folder(path: PathLike) -> Path:
    """The folder of prediction files that ``path`` names: ``path`` itself, or its
    :data:`PREDICTIONS_DIR` when ``path`` is a detection run folder."""
    path = Path(path)
    inner = path / PREDICTIONS_DIR
    if inner.is_dir() and all(_not_prediction(file) for file in path.glob('*.json')):
        return inner  # a run folder: only summary.json beside predictions/
    return path


def _not_prediction(path: Path) -> bool:
    try:
        data = _read_json(path)
    except ValueError:
        return True
    return not (isinstance(data, dict) and 'image' in data and 'detections' in data)


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
