"""Box coordinates: model conventions to image pixels and back, overlap, de-duplication.

Sizes are ``(width, height)``; boxes are ``(x1, y1, x2, y2)``.
"""
import math
from typing import Iterable, List, Optional, Sequence, Tuple

from .detection import Box, Detection

GRID_1000 = 'qwen3_grid'
"""Qwen3-VL (and Qwen2-VL): relative integers on a 0..1000 grid, whatever the image size."""
RESIZED_PIXELS = 'resized_pixels'
"""Qwen2.5-VL: absolute pixels of the resized image the model was given."""
SOURCE_PIXELS = 'source_pixels'
"""Already pixels of the source image."""
CONVENTIONS = (GRID_1000, RESIZED_PIXELS, SOURCE_PIXELS)

GRID_MAX = 1000
"""Qwen3-VL writes box coordinates as integers on a 0..GRID_MAX grid."""

Size = Tuple[float, float]


def to_pixels(box: Sequence[float], convention: str, source_size: Size,
              model_input_size: Optional[Size] = None) -> Box:
    """Map a box from ``convention`` into source-image pixels, ordered and clamped to the image.

    ``model_input_size`` (the resized image the model saw) is needed for ``RESIZED_PIXELS``.
    """
    width, height = _check_size(source_size, 'source_size')
    x1, y1, x2, y2 = _four(box)
    if convention == GRID_1000:
        scale_x, scale_y = width / GRID_MAX, height / GRID_MAX
    elif convention == RESIZED_PIXELS:
        if model_input_size is None:
            raise ValueError(f'the {RESIZED_PIXELS!r} convention needs model_input_size')
        input_width, input_height = _check_size(model_input_size, 'model_input_size')
        scale_x, scale_y = width / input_width, height / input_height
    elif convention == SOURCE_PIXELS:
        scale_x = scale_y = 1.0
    else:
        raise ValueError(f'unknown box convention {convention!r}; use one of {CONVENTIONS}')
    xs = sorted((_clamp(x1 * scale_x, width), _clamp(x2 * scale_x, width)))
    ys = sorted((_clamp(y1 * scale_y, height), _clamp(y2 * scale_y, height)))
    return xs[0], ys[0], xs[1], ys[1]


def to_grid(box_px: Sequence[float], source_size: Size) -> Tuple[int, int, int, int]:
    """Pixel box to Qwen3-VL grid integers: ``round(v / W * 1000)`` clamped to [0, 1000]."""
    width, height = _check_size(source_size, 'source_size')
    x1, y1, x2, y2 = _four(box_px)
    xs = sorted(_grid_value(x, width) for x in (x1, x2))
    ys = sorted(_grid_value(y, height) for y in (y1, y2))
    return xs[0], ys[0], xs[1], ys[1]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0.0 when they do not overlap or are empty)."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    intersection = inter_w * inter_h
    union = _area(a) + _area(b) - intersection
    return intersection / union if union > 0 else 0.0


def is_degenerate(box: Sequence[float], min_size: float = 1.0) -> bool:
    """True for a box narrower or lower than ``min_size``, or with a non-finite coordinate."""
    if not all(math.isfinite(value) for value in box):
        return True
    return (box[2] - box[0]) < min_size or (box[3] - box[1]) < min_size


def deduplicate(detections: Iterable[Detection], iou_threshold: float) -> List[Detection]:
    """Greedy per-label suppression: of two same-label boxes with IoU above the threshold, keep
    the higher score (on a tie, the earlier one). The survivors keep their input order."""
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f'iou_threshold must be within [0, 1], got {iou_threshold}')
    detections = list(detections)
    order = sorted(range(len(detections)), key=lambda index: -detections[index].score)
    kept_by_label = {}
    kept = set()
    for index in order:
        candidate = detections[index]
        same_label = kept_by_label.setdefault(candidate.label, [])
        if all(iou(candidate.box, other.box) <= iou_threshold for other in same_label):
            same_label.append(candidate)
            kept.add(index)
    return [detection for index, detection in enumerate(detections) if index in kept]


def _check_size(size: Size, name: str) -> Tuple[float, float]:
    try:
        width, height = (float(value) for value in size)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be (width, height), got {size!r}') from None
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f'{name} must be positive and finite, got {size!r}')
    return width, height


def _four(box: Sequence[float]) -> Tuple[float, float, float, float]:
    values = tuple(float(value) for value in box)
    if len(values) != 4 or not all(math.isfinite(value) for value in values):
        raise ValueError(f'a box needs 4 finite coordinates, got {box!r}')
    return values


def _clamp(value: float, limit: float) -> float:
    return min(max(value, 0.0), limit)


def _grid_value(value: float, extent: float) -> int:
    return min(max(int(round(value / extent * GRID_MAX)), 0), GRID_MAX)


def _area(box: Sequence[float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
