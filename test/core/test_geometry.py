"""Coordinate conventions, IoU, degenerate boxes and de-duplication."""
import math

import pytest

from qwen_vl_perception.detection import Detection
from qwen_vl_perception.geometry import (
    CONVENTIONS, GRID_1000, RESIZED_PIXELS, SOURCE_PIXELS, deduplicate, iou, is_degenerate,
    to_grid, to_pixels)


def test_convention_names():
    assert GRID_1000 == 'qwen3_grid'
    assert RESIZED_PIXELS == 'resized_pixels'
    assert SOURCE_PIXELS == 'source_pixels'
    assert CONVENTIONS == (GRID_1000, RESIZED_PIXELS, SOURCE_PIXELS)


def test_grid_to_pixels_on_a_non_square_image():
    assert to_pixels((100, 200, 300, 400), GRID_1000, (640, 480)) == pytest.approx(
        (64, 96, 192, 192))
    assert to_pixels((0, 0, 1000, 1000), GRID_1000, (1280, 720)) == (0, 0, 1280, 720)


def test_resized_pixels_scale_by_the_model_input_size():
    # Qwen2.5-VL saw a 640x480 image resized to 448x336 (multiples of 28).
    box = to_pixels((44.8, 33.6, 224, 336), RESIZED_PIXELS, (640, 480), (448, 336))
    assert box == pytest.approx((64, 48, 320, 480))


def test_source_pixels_are_kept():
    assert to_pixels((1.5, 2, 30, 40), SOURCE_PIXELS, (640, 480)) == (1.5, 2, 30, 40)


def test_boxes_are_clamped_and_ordered():
    assert to_pixels((1100, -50, 500, 1200), GRID_1000, (640, 480)) == (320, 0, 640, 480)
    assert to_pixels((700, 10, -3, 600), SOURCE_PIXELS, (640, 480)) == (0, 10, 640, 480)


def test_to_pixels_errors():
    with pytest.raises(ValueError, match='unknown box convention'):
        to_pixels((0, 0, 1, 1), 'normalized', (640, 480))
    with pytest.raises(ValueError, match='model_input_size'):
        to_pixels((0, 0, 1, 1), RESIZED_PIXELS, (640, 480))
    with pytest.raises(ValueError, match='positive'):
        to_pixels((0, 0, 1, 1), GRID_1000, (0, 480))
    with pytest.raises(ValueError, match='positive'):
        to_pixels((0, 0, 1, 1), RESIZED_PIXELS, (640, 480), (448, -1))
    with pytest.raises(ValueError, match='width, height'):
        to_pixels((0, 0, 1, 1), GRID_1000, 640)
    with pytest.raises(ValueError, match='4 finite'):
        to_pixels((0, 0, 1), GRID_1000, (640, 480))
    with pytest.raises(ValueError, match='4 finite'):
        to_pixels((0, 0, 1, math.inf), GRID_1000, (640, 480))


def test_to_grid():
    assert to_grid((64, 96, 192, 192), (640, 480)) == (100, 200, 300, 400)
    assert to_grid((0, 0, 640, 480), (640, 480)) == (0, 0, 1000, 1000)
    assert to_grid((-10, 500, 700, 1), (640, 480)) == (0, 2, 1000, 1000)
    assert all(isinstance(value, int) for value in to_grid((1.3, 2.7, 3, 4), (640, 480)))
    assert to_grid((1, 1, 2, 2), (3, 3)) == (333, 333, 667, 667)


def test_grid_round_trip_is_within_half_a_grid_cell():
    size = (1280, 720)
    box = (123.4, 56.7, 891.2, 700.1)
    back = to_pixels(to_grid(box, size), GRID_1000, size)
    for original, restored, extent in zip(box, back, size * 2):
        assert abs(original - restored) <= extent / 2000 + 1e-9


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_is_degenerate():
    assert not is_degenerate((0, 0, 1, 1))
    assert is_degenerate((0, 0, 0.5, 10))
    assert is_degenerate((0, 0, 10, 0))
    assert is_degenerate((5, 5, 4, 10))
    assert is_degenerate((0, 0, 10, 10), min_size=20)
    assert not is_degenerate((0, 0, 0.2, 0.2), min_size=0.1)
    assert is_degenerate((0, 0, math.nan, 10))


def detection(label, box, score):
    return Detection(label=label, box=box, score=score)


def test_deduplicate_keeps_the_higher_score_per_label():
    low = detection('cup', (0, 0, 10, 10), 0.5)
    high = detection('cup', (1, 0, 11, 10), 0.9)
    other_label = detection('bowl', (0, 0, 10, 10), 0.4)
    apart = detection('cup', (50, 50, 60, 60), 0.1)
    kept = deduplicate([low, high, other_label, apart], iou_threshold=0.5)
    assert kept == [high, other_label, apart]


def test_deduplicate_tie_keeps_the_earlier_and_preserves_order():
    first = detection('cup', (0, 0, 10, 10), 0.7)
    second = detection('cup', (0, 0, 10, 10), 0.7)
    assert deduplicate([first, second], 0.5)[0] is first
    assert len(deduplicate([first, second], 0.5)) == 1


def test_deduplicate_threshold_is_strict():
    a = detection('cup', (0, 0, 10, 10), 0.9)
    b = detection('cup', (5, 0, 15, 10), 0.8)  # IoU 1/3
    assert deduplicate([a, b], 1 / 3) == [a, b]
    assert deduplicate([a, b], 0.3) == [a]
    assert deduplicate([a, b], 1.0) == [a, b]


def test_deduplicate_is_greedy():
    # b overlaps both; a suppresses b, so c (which only overlaps b) survives.
    a = detection('cup', (0, 0, 10, 10), 0.9)
    b = detection('cup', (4, 0, 14, 10), 0.8)
    c = detection('cup', (8, 0, 18, 10), 0.7)
    assert deduplicate([c, b, a], 0.4) == [c, a]


def test_deduplicate_edge_cases():
    assert deduplicate([], 0.5) == []
    with pytest.raises(ValueError):
        deduplicate([], 1.5)
    with pytest.raises(ValueError):
        deduplicate([], -0.1)
