"""Tests for qwen_vl_perception.drawing."""
import os
import subprocess
import sys

import numpy as np
import pytest

from locations import REPO_ROOT

from qwen_vl_perception.detection import Detection
from qwen_vl_perception.drawing import draw_detections, label_color, place_tag, to_ascii

GREY = 90


def grey_image(height=200, width=300):
    return np.full((height, width, 3), GREY, dtype=np.uint8)


def changed(before, after):
    return (before != after).any(axis=2)


def test_box_edges_are_drawn_and_far_pixels_untouched():
    image = grey_image()
    cup = Detection(label='cup', box=(50.0, 80.0, 150.0, 160.0), score=0.87)
    result = draw_detections(image, [cup])
    color = label_color('cup')
    for y, x in ((120, 50), (120, 150), (160, 100), (80, 100)):  # left, right, bottom, top
        assert tuple(result[y, x]) == color, (y, x)
    assert (result[85:155, 55:145] == GREY).all()  # the inside is not filled
    mask = changed(image, result)
    rows, cols = np.nonzero(mask)
    assert rows.max() <= 162 and cols.min() >= 48  # nothing below / left of the box
    assert (~mask[165:]).all() and (~mask[:, 200:]).all()
    assert mask[40:80, 50:100].sum() > 200  # the tag sits right above the box


def test_input_is_not_modified_and_result_is_new():
    image = grey_image()
    original = image.copy()
    result = draw_detections(image, [Detection('cup', (10, 10, 60, 60), 0.5)])
    np.testing.assert_array_equal(image, original)
    assert result is not image and not np.shares_memory(result, image)
    empty = draw_detections(image, [])
    np.testing.assert_array_equal(empty, image)
    assert empty is not image


def test_label_colors_are_stable_and_distinct():
    assert label_color('cup') == label_color('cup') == label_color(' Cup ')
    labels = ['cup', 'table', 'chair', 'person', 'bottle', 'laptop', 'book', 'door',
              'window', 'plant', 'box', 'phone']
    colors = [label_color(label) for label in labels]
    assert len(set(colors)) == len(labels)
    assert all(max(color) >= 180 for color in colors)  # bright enough to see on dark scenes
    assert all(0 <= channel <= 255 for color in colors for channel in color)


def test_label_colors_do_not_depend_on_the_process_hash_seed():
    code = ('from qwen_vl_perception.drawing import label_color; '
            'print(label_color("cup"), label_color("table"))')
    outputs = set()
    for seed in ('1', '2'):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        completed = subprocess.run([sys.executable, '-c', code], env=env, check=True,
                                   capture_output=True, text=True,
                                   cwd=REPO_ROOT)
        outputs.add(completed.stdout.strip())
    assert outputs == {f'{label_color("cup")} {label_color("table")}'}


def test_same_label_same_color_in_drawn_image():
    image = grey_image()
    result = draw_detections(image, [Detection('cup', (20, 60, 80, 120), 0.9),
                                     Detection('cup', (150, 60, 250, 120), 0.4),
                                     Detection('table', (100, 150, 200, 190), 0.7)])
    assert tuple(result[90, 20]) == tuple(result[90, 150]) == label_color('cup')
    assert tuple(result[170, 100]) == label_color('table')


@pytest.mark.parametrize('box', [(0, 0, 30, 20), (270, 180, 299, 199), (0, 190, 300, 200),
                                 (280, 0, 400, 10), (-50, -50, 40, 40)])
def test_tags_stay_inside_the_image_at_the_border(box):
    image = grey_image()
    detection = Detection('a rather long label', box, 0.99)
    result = draw_detections(image, [detection])
    color = np.array(label_color(detection.label))
    tag_rows = np.nonzero((result == color).all(axis=2).sum(axis=1) > 60)[0]
    assert tag_rows.size >= 8  # a full tag of filled rows is visible


@pytest.mark.parametrize('box', [(0, 0, 30, 20), (290, 190, 299, 199), (-10, 150, 5, 260)])
def test_place_tag_keeps_the_tag_inside(box):
    left, top = place_tag(box, 80, 20, 300, 200)
    assert 0 <= left <= 300 - 80 and 0 <= top <= 200 - 20


def test_place_tag_prefers_above_the_box():
    assert place_tag((50, 80, 150, 160), 60, 20, 300, 200) == (50, 60)
    assert place_tag((50, 10, 150, 160), 60, 20, 300, 200) == (50, 10)  # no room: inside


@pytest.mark.parametrize('box', [
    (500, 500, 600, 600),            # fully outside
    (-100, -100, -10, -10),          # fully outside, negative
    (float('nan'), 0, 10, 10),       # not finite
    (0, 0, float('inf'), 10),
])
def test_invisible_boxes_are_skipped(box):
    image = grey_image()
    np.testing.assert_array_equal(draw_detections(image, [Detection('x', box, 0.5)]), image)


@pytest.mark.parametrize('box', [
    (50, 50, 50, 50),                # zero size
    (150, 120, 40, 30),              # corners swapped
    (-1e12, -1e12, 1e12, 1e12),      # far beyond int32
    (290.6, 10.2, 310.9, 50.5),      # partly outside, fractional
])
def test_odd_boxes_are_drawn_without_crashing(box):
    image = grey_image()
    result = draw_detections(image, [Detection('thing', box, 0.5)])
    assert changed(image, result).any()


def test_unicode_labels_are_drawn_as_ascii():
    assert to_ascii('tasse à café') == 'tasse a cafe'
    assert to_ascii('杯子\n☕') == '?? ?'
    image = grey_image()
    result = draw_detections(image, [Detection('杯子 ☕', (20, 40, 120, 120), 0.5,
                                               {'färbe': 'röt'})], show_attributes=True)
    assert changed(image, result).any()


def test_attributes_scores_and_ids_change_the_tag():
    image = grey_image()
    detection = Detection('cup', (50, 100, 150, 180), 0.87, {'color': 'red', 'shape': 'round'},
                          id='3')

    def tag_pixels(**options):
        return changed(image, draw_detections(image, [detection], **options))[:100].sum()

    plain = tag_pixels(show_scores=False)
    with_score = tag_pixels()
    with_attributes = tag_pixels(show_attributes=True)
    with_id = tag_pixels(show_ids=True)
    assert plain < with_score < with_id
    assert with_attributes > with_score * 1.5  # a second line


def test_line_thickness_and_text_scale_with_image_size():
    def edge_width(size):
        image = grey_image(size, size)
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        result = draw_detections(image, [Detection('cup', box, 0.5)])
        return changed(image, result)[size // 2, : size // 2].sum()

    def tag_height(size):
        image = grey_image(size, size)
        box = (size // 4, size // 2, 3 * size // 4, 3 * size // 4)
        result = draw_detections(image, [Detection('cup', box, 0.5)])
        return changed(image, result)[: size // 2, size // 4 + 5].sum()

    assert edge_width(1200) >= 3 * edge_width(200)
    assert tag_height(1200) >= 2.5 * tag_height(200)


def test_best_score_tag_is_drawn_on_top():
    image = grey_image()
    low = Detection('table', (50, 80, 200, 160), 0.2)
    high = Detection('cup', (52, 80, 150, 160), 0.9)
    for order in ([low, high], [high, low]):
        result = draw_detections(image, order)
        assert tuple(result[78, 54]) == label_color('cup')


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError, match=r'\(H, W, 3\) uint8'):
        draw_detections(np.zeros((10, 10), np.uint8), [])
    with pytest.raises(ValueError, match=r'\(H, W, 3\) uint8'):
        draw_detections(np.zeros((10, 10, 3), np.float32), [])
