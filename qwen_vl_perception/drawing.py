"""Draw detections onto an RGB image (for the annotated-image topic and the folder tools).

Each label gets a colour derived from a stable hash of its text (MD5, not Python's salted
``hash()``), so the same label has the same colour in every frame and every process. Line
width and text size scale with the image. OpenCV's Hershey fonts only draw ASCII: other
characters are transliterated where possible ("café" -> "cafe") and replaced by "?"
otherwise.
"""
import colorsys
import hashlib
import math
import unicodedata
from typing import Iterable, List, Sequence, Tuple

import cv2
import numpy as np

from qwen_vl_perception.detection import Detection

Color = Tuple[int, int, int]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)


def label_color(label: str) -> Color:
    """A bright, stable RGB colour for ``label`` (case and surrounding space ignored)."""
    digest = hashlib.md5(label.strip().lower().encode('utf-8')).digest()
    hue = int.from_bytes(digest[:2], 'big') / 65536.0
    saturation = 0.65 + 0.35 * digest[2] / 255.0
    value = 0.75 + 0.25 * digest[3] / 255.0
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def _text_color(background: Color) -> Color:
    red, green, blue = background
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return _BLACK if luminance > 140 else _WHITE


def to_ascii(text: str) -> str:
    """``text`` reduced to printable ASCII for OpenCV's fonts."""
    decomposed = unicodedata.normalize('NFKD', str(text))
    characters = []
    for character in decomposed:
        if unicodedata.combining(character):
            continue  # accents of a decomposed letter
        if character.isascii() and character.isprintable():
            characters.append(character)
        else:
            characters.append(' ' if character.isspace() else '?')
    return ''.join(characters)


def _tag_lines(detection: Detection, show_scores: bool, show_attributes: bool,
               show_ids: bool) -> List[str]:
    title = str(detection.label)
    if show_ids and detection.id:
        title += f' #{detection.id}'
    if show_scores:
        try:
            title += f' {float(detection.score):.2f}'
        except (TypeError, ValueError):
            pass
    lines = [to_ascii(title)]
    if show_attributes and detection.attributes:
        described = ', '.join(str(value) if value not in (None, '') else str(key)
                              for key, value in detection.attributes.items())
        lines.append(to_ascii(described))
    return lines


def _style(height: int, width: int) -> Tuple[int, float, int]:
    """(box line thickness, font scale, text thickness) for an image of this size."""
    short_side = min(height, width)
    line_thickness = max(1, round(short_side / 320))
    font_scale = max(0.35, short_side / 1000.0)
    text_thickness = max(1, round(font_scale * 1.5))
    return line_thickness, font_scale, text_thickness


def _pixel_box(box: Sequence[float], height: int, width: int):
    """Integer corners clipped to the image, or None when the box is invalid or outside."""
    try:
        x1, y1, x2, y2 = (float(value) for value in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(value) for value in (x1, y1, x2, y2)):
        return None
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    if x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1:
        return None
    return (int(round(min(max(x1, 0), width - 1))), int(round(min(max(y1, 0), height - 1))),
            int(round(min(max(x2, 0), width - 1))), int(round(min(max(y2, 0), height - 1))))


def place_tag(box: Tuple[int, int, int, int], tag_width: int, tag_height: int,
              image_width: int, image_height: int) -> Tuple[int, int]:
    """Top-left corner of a label tag: above the box when there is room, else just inside its
    top edge; always shifted so that the tag lies inside the image when it fits at all."""
    x1, y1 = box[0], box[1]
    top = y1 - tag_height if y1 - tag_height >= 0 else y1
    top = min(max(top, 0), max(image_height - tag_height, 0))
    left = min(max(x1, 0), max(image_width - tag_width, 0))
    return left, top


def draw_detections(rgb: np.ndarray, detections: Iterable[Detection], show_scores: bool = True,
                    show_attributes: bool = False, show_ids: bool = False) -> np.ndarray:
    """A copy of ``rgb`` (H, W, 3 uint8) with a box and a label tag per detection.

    The tag reads e.g. ``"cup 0.87"`` (with ``show_ids``: ``"cup #3 0.87"``) and, with
    ``show_attributes``, a second line of attribute values (``"red, round"``). Boxes partly
    outside the image are clipped, boxes fully outside or with non-finite corners are
    skipped. The input array is not modified.
    """
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
            or rgb.shape[2] != 3:
        raise ValueError('draw_detections expects an (H, W, 3) uint8 RGB array')
    canvas = np.ascontiguousarray(rgb).copy()
    height, width = canvas.shape[:2]
    if height == 0 or width == 0:
        return canvas
    line_thickness, font_scale, text_thickness = _style(height, width)
    padding = max(2, line_thickness)

    visible = []
    for detection in detections:
        box = _pixel_box(detection.box, height, width)
        if box is not None:
            visible.append((detection, box, label_color(str(detection.label))))
    # Boxes first, then tags, so that no box line crosses another detection's text; the
    # best-scoring detections are drawn last (on top).
    visible.sort(key=lambda item: _sort_score(item[0]))
    for _, (x1, y1, x2, y2), color in visible:
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, line_thickness, cv2.LINE_8)
    for detection, box, color in visible:
        lines = _tag_lines(detection, show_scores, show_attributes, show_ids)
        _draw_tag(canvas, box, lines, color, font_scale, text_thickness, padding)
    return canvas


def _sort_score(detection: Detection) -> float:
    try:
        score = float(detection.score)
    except (TypeError, ValueError):
        return -math.inf
    return score if math.isfinite(score) else -math.inf


def _draw_tag(canvas: np.ndarray, box, lines: List[str], color: Color, font_scale: float,
              text_thickness: int, padding: int) -> None:
    sizes = [cv2.getTextSize(line, _FONT, font_scale, text_thickness) for line in lines]
    line_height = max(size[1] + baseline for size, baseline in sizes) + padding
    tag_width = max(size[0] for size, _ in sizes) + 2 * padding
    tag_height = line_height * len(lines) + padding
    height, width = canvas.shape[:2]
    left, top = place_tag(box, tag_width, tag_height, width, height)
    cv2.rectangle(canvas, (left, top), (left + tag_width - 1, top + tag_height - 1), color,
                  cv2.FILLED)
    text_color = _text_color(color)
    for index, (line, ((_, text_height), baseline)) in enumerate(zip(lines, sizes)):
        baseline_y = top + padding + index * line_height + text_height
        cv2.putText(canvas, line, (left + padding, baseline_y), _FONT, font_scale, text_color,
                    text_thickness, cv2.LINE_AA)
