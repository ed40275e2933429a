"""Object scores from token probabilities."""
import math

import pytest

from qwen_vl_perception.categories import LabelMatcher
from qwen_vl_perception.detection import ParsedObject
from qwen_vl_perception.parsing import parse_objects
from qwen_vl_perception.scoring import object_scores, span_score


def test_geometric_mean_of_overlapping_tokens():
    offsets = [(0, 2), (2, 5), (5, 9), (9, 12)]
    probs = [0.1, 0.5, 0.8, 0.2]
    assert span_score((2, 9), offsets, probs) == pytest.approx(math.sqrt(0.5 * 0.8))
    # Partial overlap counts the token.
    assert span_score((4, 6), offsets, probs) == pytest.approx(math.sqrt(0.5 * 0.8))
    assert span_score((0, 12), offsets, probs) == pytest.approx((0.1 * 0.5 * 0.8 * 0.2) ** 0.25)


def test_touching_tokens_do_not_overlap():
    offsets = [(0, 2), (2, 5), (5, 9)]
    probs = [0.1, 0.5, 0.9]
    assert span_score((2, 5), offsets, probs) == pytest.approx(0.5)


def test_no_overlap_gives_zero():
    assert span_score((20, 30), [(0, 2), (2, 5)], [0.9, 0.9]) == 0.0
    assert span_score((0, 5), [], []) == 0.0
    assert span_score((3, 3), [(0, 5)], [0.9]) == 0.0


def test_zero_width_token_inside_the_span_counts():
    assert span_score((0, 5), [(0, 2), (2, 2), (2, 5)], [1.0, 0.25, 1.0]) == pytest.approx(
        0.25 ** (1 / 3))
    assert span_score((0, 2), [(0, 2), (2, 2)], [0.5, 0.01]) == pytest.approx(0.5)


def test_a_zero_probability_token_gives_zero():
    assert span_score((0, 4), [(0, 2), (2, 4)], [0.9, 0.0]) == 0.0
    assert span_score((0, 4), [(0, 2), (2, 4)], [0.9, float('nan')]) == 0.0


def test_score_is_within_unit_interval():
    assert span_score((0, 4), [(0, 2), (2, 4)], [1.0, 1.0000001]) == pytest.approx(1.0)
    assert span_score((0, 4), [(0, 2), (2, 4)], [1.0, 1.5]) <= 1.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        span_score((0, 1), [(0, 1)], [])
    with pytest.raises(ValueError):
        object_scores([], [(0, 1)], [])


def token_layout(text, probability_of):
    """Cut ``text`` into 3-character tokens; a token's probability comes from its text."""
    offsets = [(start, min(start + 3, len(text))) for start in range(0, len(text), 3)]
    return offsets, [probability_of(text[start:end]) for start, end in offsets]


def test_object_scores_follow_the_parsed_spans():
    text = ('```json\n[\n  {"bbox_2d": [1, 2, 3, 4], "label": "cup"},\n'
            '  {"bbox_2d": [5, 6, 7, 8], "label": "bowl"}\n]\n```')
    objects = parse_objects(text, LabelMatcher(['cup', 'bowl'])).objects
    # The model was unsure only where it wrote "bowl".
    offsets, probs = token_layout(text, lambda piece: 0.3 if 'ow' in piece else 0.99)
    scores = object_scores(objects, offsets, probs)
    assert scores[0] == pytest.approx(0.99)
    assert 0.3 < scores[1] < 0.99
    assert scores == [pytest.approx(span_score(obj.span, offsets, probs)) for obj in objects]


def test_object_scores_match_span_score_for_unsorted_offsets():
    offsets = [(5, 9), (0, 2), (2, 5), (9, 12)]
    probs = [0.8, 0.1, 0.5, 0.2]
    objects = [ParsedObject('a', (0, 0, 1, 1), span=(2, 9)),
               ParsedObject('b', (0, 0, 1, 1), span=(9, 12)),
               ParsedObject('c', (0, 0, 1, 1), span=(40, 50))]
    assert object_scores(objects, offsets, probs) == [
        pytest.approx(math.sqrt(0.5 * 0.8)), pytest.approx(0.2), 0.0]


def test_object_scores_with_sorted_offsets_equal_brute_force():
    offsets = [(index, index + 1) for index in range(200)] + [(200, 200), (200, 203)]
    probs = [0.5 + 0.002 * index for index in range(len(offsets))]
    objects = [ParsedObject('x', (0, 0, 1, 1), span=(start, start + length))
               for start in range(0, 205, 7) for length in (0, 1, 5, 30)]
    fast = object_scores(objects, offsets, probs)
    slow = [span_score(obj.span, offsets, probs) for obj in objects]
    assert fast == pytest.approx(slow)
    assert object_scores([], offsets, probs) == []


def test_value_spans_cover_box_numbers_and_label_only():
    from qwen_vl_perception.scoring import value_spans
    text = 'x {"bbox_2d": [12, 345, 6, 7890], "label": "tissue box", "color": "red"} y'
    span = (2, len(text) - 2)
    pieces = [text[s:e] for s, e in value_spans(text, span)]
    assert pieces == ['12', '345', '6', '7890', 'tissue box']


def test_object_score_ignores_near_certain_json_punctuation():
    from qwen_vl_perception.scoring import object_score
    text = '{"bbox_2d": [10, 20], "label": "cup"}'
    # Tokens: '{"bbox_2d": [' (1.0), '10' (0.5), ', ' (1.0), '20' (0.5), '], "label": "' (1.0),
    # 'cup' (0.5), '"}' (1.0).
    pieces = ['{"bbox_2d": [', '10', ', ', '20', '], "label": "', 'cup', '"}']
    offsets, position = [], 0
    for piece in pieces:
        offsets.append((position, position + len(piece)))
        position += len(piece)
    probs = [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0]
    assert object_score(text, (0, len(text)), offsets, probs) == pytest.approx(0.5)
    assert span_score((0, len(text)), offsets, probs) == pytest.approx(0.5 ** (3 / 7))
