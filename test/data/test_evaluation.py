"""Tests of qwen_vl_perception.data.evaluation and tools/evaluate.py."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tool_runs import load_tool

from qwen_vl_perception.detection import Detection
from qwen_vl_perception.data.evaluation import (box_iou, evaluate, format_table, match_greedy,
                                                plot_report)
from qwen_vl_perception.data.labels import GroundTruthObject, LabeledImage, write_coco, \
    write_prediction_file


def gt(label, box, **attributes):
    return GroundTruthObject(label, tuple(float(v) for v in box), dict(attributes))


def det(label, box, score, **attributes):
    return Detection(label, tuple(float(v) for v in box), score, dict(attributes))


def tiny_case():
    """2 images, 3 cups, 4 cup predictions and one stray 'ball'.

    a.png: GT cup A1 [0,0,10,10] (red), GT cup A2 [50,50,70,70] (red)
    b.png: GT cup B1 [0,0,20,20] (blue)
    predictions (score, IoU with its best GT):
      p1 a.png [0,0,10,10]   0.9  IoU 1.0 with A1                      -> TP, color red (right)
      p2 a.png [50,50,70,62] 0.8  inter 20*12=240, union 400 -> 0.6 A2 -> TP, color blue (wrong)
      p3 b.png [10,0,30,20]  0.7  inter 10*20=200, union 600 -> 0.33   -> FP
      p4 b.png [0,0,20,20]   0.6  IoU 1.0 with B1                      -> TP, no color (wrong)
      ball b.png [60,60,80,80] 0.5 (no ball in the ground truth)      -> FP for 'ball'
    """
    truth = [
        LabeledImage('/data/a.png', 100, 100, [gt('cup', (0, 0, 10, 10), color='red'),
                                               gt('cup', (50, 50, 70, 70), color='red')]),
        LabeledImage('/data/b.png', 100, 100, [gt('cup', (0, 0, 20, 20), color='blue')]),
    ]
    predictions = {
        'a.png': [det('cup', (0, 0, 10, 10), 0.9, color='red'),
                  det('cup', (50, 50, 70, 62), 0.8, color='Blue')],
        'b.png': [det('cup', (10, 0, 30, 20), 0.7, color='blue'),
                  det('cup', (0, 0, 20, 20), 0.6),
                  det('ball', (60, 60, 80, 80), 0.5)],
    }
    return truth, predictions


def test_box_iou_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((50, 50, 70, 70), (50, 50, 70, 62)) == pytest.approx(0.6)
    assert box_iou((0, 0, 20, 20), (10, 0, 30, 20)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0


def test_match_greedy_takes_highest_score_first_and_best_iou():
    truth = [(0, 0, 10, 10), (5, 0, 15, 10)]
    # The 0.9 prediction overlaps both; it takes the better one (IoU 1 with the second).
    predictions = [((5, 0, 15, 10), 0.9), ((4, 0, 14, 10), 0.8), ((0, 0, 10, 10), 0.3)]
    assert match_greedy(truth, predictions, 0.5) == [1, None, 0]
    # One GT per prediction: a duplicate of a matched GT is a false positive.
    assert match_greedy([(0, 0, 10, 10)], [((0, 0, 10, 10), 0.5), ((0, 0, 10, 10), 0.7)],
                        0.5) == [None, 0]


def test_hand_computed_case():
    truth, predictions = tiny_case()
    report = evaluate(truth, predictions)
    cup = report.category('cup')
    # Threshold 0: TP p1, p2, p4; FP p3.
    assert (cup.true_positives, cup.false_positives, cup.false_negatives) == (3, 1, 0)
    assert cup.precision == pytest.approx(3 / 4)
    assert cup.recall == pytest.approx(1.0)
    # AP@0.5 by hand. By score: p1 TP (P 1, R 1/3), p2 TP (1, 2/3), p3 FP (2/3, 2/3),
    # p4 TP (3/4, 1). Precision envelope (max to the right): 1, 1, 3/4, 3/4.
    # 101 recall points r = k/100: k = 0..33 -> 1 (34 points), k = 34..66 -> 1 (33 points),
    # k = 67..100 -> 3/4 (34 points). AP = (67 + 34 * 0.75) / 101 = 92.5 / 101.
    assert cup.ap50 == pytest.approx(92.5 / 101)
    # AP@[.5:.95]: p2's IoU 0.6 stops matching from IoU 0.65 on (thresholds 0.65..0.95,
    # 7 of 10). There: p1 TP (1, 1/3), p2 FP (1/2, 1/3), p3 FP (1/3, 1/3), p4 TP (1/2, 2/3);
    # envelope 1, 1/2, 1/2, 1/2; k = 0..33 -> 1 (34 points), k = 34..66 -> 1/2 (33 points),
    # k = 67..100 -> 0 (recall never reaches 1). AP = (34 + 16.5) / 101 = 50.5 / 101.
    # At 0.5, 0.55, 0.6 AP = 92.5 / 101 as above.
    assert cup.ap == pytest.approx((3 * 92.5 / 101 + 7 * 50.5 / 101) / 10)

    ball = report.category('ball')
    assert ball.num_ground_truth == 0 and ball.false_positives == 1
    assert ball.ap50 is None and ball.recall is None and ball.precision == 0.0
    # 'ball' has no ground truth: it is left out of the means.
    assert report.map50 == pytest.approx(cup.ap50)
    assert report.map == pytest.approx(cup.ap)
    assert report.precision == pytest.approx(3 / 5)  # 3 TP of 5 predictions over all classes
    assert report.recall == pytest.approx(1.0)

    # Colour on the 3 matched pairs: p1 right, p2 'Blue' vs red wrong, p4 missing -> 1/3.
    color = report.attributes['color']
    assert (color.correct, color.total, color.missing) == (1, 3, 1)
    assert color.accuracy == pytest.approx(1 / 3)
    assert cup.attributes['color'].accuracy == pytest.approx(1 / 3)


def test_attributes_no_prediction_has_are_not_reported():
    # The ground truth knows colours and shapes; the model was asked for colours only.
    truth = [LabeledImage('/data/a.png', 100, 100, [gt('cup', (0, 0, 10, 10), color='red',
                                                       shape='round')])]
    predictions = {'a.png': [det('cup', (0, 0, 10, 10), 0.9, color='red')]}
    report = evaluate(truth, predictions)
    assert list(report.attributes) == ['color']
    assert 'shape' not in format_table(report)
    assert evaluate(truth, {'a.png': [det('cup', (0, 0, 10, 10), 0.9)]}).attributes == {}


def test_score_threshold_changes_precision_recall_not_ap():
    truth, predictions = tiny_case()
    report = evaluate(truth, predictions, score_threshold=0.65)
    cup = report.category('cup')
    # p4 (0.6) is dropped: TP p1, p2; FP p3; B1 is missed.
    assert (cup.true_positives, cup.false_positives, cup.false_negatives) == (2, 1, 1)
    assert cup.precision == pytest.approx(2 / 3)
    assert cup.recall == pytest.approx(2 / 3)
    assert cup.ap50 == pytest.approx(92.5 / 101)
    assert report.category('ball').num_predictions == 0


def test_iou_threshold_for_matching():
    truth, predictions = tiny_case()
    cup = evaluate(truth, predictions, iou_threshold=0.7).category('cup')
    # p2 (IoU 0.6) no longer matches: TP p1, p4; FP p2, p3; A2 missed.
    assert (cup.true_positives, cup.false_positives, cup.false_negatives) == (2, 2, 1)


def test_perfect_predictions_score_one():
    truth = [
        LabeledImage('x/one.png', 200, 100, [gt('ball', (10, 10, 50, 50), color='red'),
                                             gt('box', (60, 20, 120, 90), color='blue')]),
        LabeledImage('x/two.png', 200, 100, [gt('ball', (100, 5, 180, 85), color='green')]),
    ]
    predictions = {image.name: [det(o.label, o.box, 0.9, **o.attributes)
                                for o in image.objects] for image in truth}
    report = evaluate(truth, predictions)
    for category in report.categories:
        assert category.precision == 1.0 and category.recall == 1.0
        assert category.ap50 == pytest.approx(1.0) and category.ap == pytest.approx(1.0)
    assert report.map50 == pytest.approx(1.0) and report.map == pytest.approx(1.0)
    assert report.attributes['color'].accuracy == 1.0
    assert report.attributes['color'].total == 3


def test_no_predictions_gives_zero_recall():
    truth, _ = tiny_case()
    report = evaluate(truth, {})
    cup = report.category('cup')
    assert cup.recall == 0.0 and cup.precision is None
    assert cup.false_negatives == 3 and cup.ap50 == 0.0 and cup.ap == 0.0
    assert report.map50 == 0.0
    assert report.images_without_predictions == ['a.png', 'b.png']
    assert report.attributes == {}


def test_wrong_label_is_no_match_and_categories_filter():
    truth = [LabeledImage('c.png', 50, 50, [gt('cup', (0, 0, 20, 20))])]
    predictions = {'c.png': [det('mug', (0, 0, 20, 20), 0.9)], 'other.png': []}
    report = evaluate(truth, predictions)
    assert report.category('cup').recall == 0.0 and report.category('cup').ap50 == 0.0
    assert report.category('mug').false_positives == 1
    assert report.predictions_without_ground_truth == ['other.png']
    only_cup = evaluate(truth, predictions, categories=['cup'])
    assert [c.name for c in only_cup.categories] == ['cup']
    assert only_cup.ignored_predictions == 1 and only_cup.false_positives == 0


def test_duplicate_ground_truth_names_rejected():
    truth = [LabeledImage('a/x.png', 10, 10), LabeledImage('b/x.png', 10, 10)]
    with pytest.raises(ValueError, match='x.png'):
        evaluate(truth, {})


def independent_ap50(truth, predictions, label):
    """AP@0.5 written from COCO's definition, sharing no code with the module under test."""
    records = []  # (score, is_true_positive)
    total = 0
    for image in truth:
        boxes = [o.box for o in image.objects if o.label == label]
        total += len(boxes)
        dets = sorted((d for d in predictions.get(image.name, []) if d.label == label),
                      key=lambda d: -d.score)
        used = set()
        for d in dets:
            best, best_iou = None, 0.5
            for index, b in enumerate(boxes):
                if index in used:
                    continue
                iw = min(d.box[2], b[2]) - max(d.box[0], b[0])
                ih = min(d.box[3], b[3]) - max(d.box[1], b[1])
                inter = max(iw, 0) * max(ih, 0)
                union = ((d.box[2] - d.box[0]) * (d.box[3] - d.box[1])
                         + (b[2] - b[0]) * (b[3] - b[1]) - inter)
                iou = inter / union
                if iou >= best_iou:
                    best, best_iou = index, iou
            if best is not None:
                used.add(best)
            records.append((d.score, best is not None))
    records.sort(key=lambda r: -r[0])
    tp = np.cumsum([r[1] for r in records])
    fp = np.cumsum([not r[1] for r in records])
    recall = tp / total
    precision = tp / np.maximum(tp + fp, 1e-12)
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    points = []
    for r in np.linspace(0, 1, 101):
        index = np.searchsorted(recall, r, side='left')
        points.append(precision[index] if index < len(precision) else 0.0)
    return float(np.mean(points))


def test_ap50_matches_an_independent_implementation():
    rng = np.random.default_rng(7)
    labels = ['ball', 'box', 'cone']
    truth, predictions = [], {}
    for index in range(25):
        objects, dets = [], []
        for _ in range(rng.integers(0, 5)):
            label = labels[rng.integers(3)]
            x, y = rng.uniform(0, 200, size=2)
            w, h = rng.uniform(10, 60, size=2)
            objects.append(gt(label, (x, y, x + w, y + h)))
            if rng.random() < 0.8:  # found, with jitter (some fall under IoU 0.5)
                jitter = rng.normal(0, 0.18, size=4) * [w, h, w, h]
                box = np.array([x, y, x + w, y + h]) + jitter
                box[2:] = np.maximum(box[2:], box[:2] + 1)
                dets.append(det(label, box, float(rng.random())))
        for _ in range(rng.integers(0, 3)):  # false alarms
            x, y = rng.uniform(0, 200, size=2)
            dets.append(det(labels[rng.integers(3)], (x, y, x + 30, y + 30),
                            float(rng.random())))
        name = f'img_{index}.png'
        truth.append(LabeledImage(name, 260, 260, objects))
        predictions[name] = dets
    report = evaluate(truth, predictions)
    for label in labels:
        expected = independent_ap50(truth, predictions, label)
        assert 0.1 < expected < 0.99  # a non-trivial case
        assert report.category(label).ap50 == pytest.approx(expected, abs=1e-9)


def test_report_outputs(tmp_path):
    truth, predictions = tiny_case()
    report = evaluate(truth, predictions)
    data = json.loads(json.dumps(report.to_dict()))
    assert data['map50'] == pytest.approx(92.5 / 101)
    assert data['attributes']['color'] == {'accuracy': pytest.approx(1 / 3), 'correct': 1,
                                           'total': 3, 'missing': 1}
    cup = next(c for c in data['categories'] if c['name'] == 'cup')
    assert cup['precision'] == 0.75 and len(cup['pr_curve']) == 101
    table = format_table(report)
    assert 'cup' in table and '0.916' in table and 'color: 0.333 (1/3, 1 without it)' in table
    plot_report(report, tmp_path / 'plot.png')
    assert (tmp_path / 'plot.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_evaluate_tool(tmp_path, capsys):
    truth, predictions = tiny_case()
    for image in truth:
        image.image_path = str(tmp_path / 'data' / 'images' / image.name)
    write_coco(truth, tmp_path / 'data' / 'annotations.json')
    pred_dir = tmp_path / 'pred'
    for name, dets in predictions.items():
        write_prediction_file(pred_dir / (Path(name).stem + '.json'), name, 100, 100, dets)
    tool = load_tool('evaluate')
    out = tmp_path / 'out'
    args = ['--labels', str(tmp_path / 'data' / 'annotations.json'), '--predictions',
            str(pred_dir), '--out', str(out), '--score-threshold', '0.65']
    assert tool.main(args) == 0
    printed = capsys.readouterr().out
    assert 'cup' in printed and 'metrics.json' in printed
    metrics = json.loads((out / 'metrics.json').read_text())
    cup = next(c for c in metrics['categories'] if c['name'] == 'cup')
    assert cup['recall'] == pytest.approx(2 / 3) and metrics['score_threshold'] == 0.65
    assert math.isclose(metrics['map50'], 92.5 / 101)
    assert (out / 'metrics.png').stat().st_size > 1000
    # A non-empty --out is refused without --overwrite, accepted with it.
    assert tool.main(args) == 2
    assert 'overwrite' in capsys.readouterr().err
    assert tool.main(args + ['--overwrite']) == 0
    # A malformed prediction file is reported by name, not a traceback.
    (pred_dir / 'bad.json').write_text('{"image": "c.png", "width": 10, "height": 10, '
                                       '"detections": [{"label": "cup", "box": [1, 2]}]}')
    assert tool.main(args + ['--overwrite']) == 2
    assert 'bad.json' in capsys.readouterr().err


def test_evaluate_tool_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool('evaluate').main(['--help'])
    assert exit_info.value.code == 0
    assert 'example:' in capsys.readouterr().out
