"""detections_from_text: one model answer -> pixel detections (parser, coordinates, scores,
thresholds, de-duplication, ids), fed fixed model text."""
import pytest

from qwen_vl_perception.detector import DetectionSettings, detections_from_text, prepare_settings
from qwen_vl_perception.geometry import RESIZED_PIXELS

ANSWER = ('```json\n[\n'
          '  {"bbox_2d": [100, 200, 300, 400], "label": "cups", "color": "red"},\n'
          '  {"bbox_2d": [105, 205, 305, 405], "label": "cup", "color": "red"},\n'
          '  {"bbox_2d": [500, 500, 500, 900], "label": "bottle"},\n'
          '  {"bbox_2d": [0, 0, 1000, 1000], "label": "sofa"},\n'
          '  {"bbox_2d": [600, 100, 900, 300], "label": "Bottle", "color": "green"}\n]\n```')


def prepared(**changes):
    settings = DetectionSettings(categories=('cup', 'bottle'), attributes=('color',))
    return prepare_settings(settings.with_changes(**changes))


def test_answer_becomes_pixel_detections_with_counts():
    frame = detections_from_text(ANSWER, prepared(), (640, 480))
    assert [(d.id, d.label) for d in frame.detections] == [('0', 'cup'), ('1', 'bottle')]
    assert frame.detections[0].box == pytest.approx((64.0, 96.0, 192.0, 192.0))
    assert frame.detections[1].box == pytest.approx((384.0, 48.0, 576.0, 144.0))
    assert frame.detections[1].attributes == {'color': 'green'}
    assert frame.unknown_labels == ['sofa']
    assert (frame.degenerate, frame.duplicates, frame.truncated) == (1, 1, False)
    assert all(d.score == 1.0 for d in frame.detections)  # no token probabilities given


def test_scores_from_token_probabilities_and_threshold():
    text = '[{"bbox_2d": [100, 200, 300, 400], "label": "cup"}]'
    offsets = [(i, i + 1) for i in range(len(text))]  # one character per token
    probs = [0.25 if text[i].isdigit() else 1.0 for i in range(len(text))]
    frame = detections_from_text(text, prepared(), (640, 480), token_offsets=offsets,
                                 token_probs=probs)
    (detection,) = frame.detections
    # Scored: the 12 box digits (0.25 each) and the 3 label characters (1.0); not the 2 of
    # "bbox_2d" nor any punctuation.
    assert detection.score == pytest.approx(0.25 ** (12 / 15))
    assert detections_from_text(text, prepared(score_threshold=0.5), (640, 480),
                                token_offsets=offsets, token_probs=probs).below_threshold == 1


def test_qwen25_style_boxes_use_the_model_input_size():
    text = '[{"bbox_2d": [32, 64, 96, 128], "label": "cup"}]'
    frame = detections_from_text(text, prepared(coordinate_convention=RESIZED_PIXELS),
                                 (1280, 960), model_input_size=(320, 240))
    assert frame.detections[0].box == pytest.approx((128.0, 256.0, 384.0, 512.0))


def test_invalid_settings_are_refused_with_a_reason():
    with pytest.raises(ValueError, match='coordinate_convention'):
        prepared(coordinate_convention='pixels')
    with pytest.raises(ValueError, match='score_threshold'):
        prepared(score_threshold=1.5)
