"""Detection metrics: COCO AP (pycocotools), precision/recall at a threshold, attribute accuracy.

* ``ap50`` and ``ap`` (AP averaged over IoU 0.50:0.05:0.95) per category come from
  pycocotools' ``COCOeval`` (101-point interpolated, all predictions whatever their score).
* Precision, recall and TP/FP/FN use the predictions with ``score >= score_threshold`` and a
  greedy matching per image and category: predictions in descending score order each take the
  unmatched ground-truth box of highest IoU, if that IoU is ``>= iou_threshold``.
* Attribute accuracy is measured on those matched pairs, for every attribute key of the
  ground-truth object that some prediction has (a key no prediction has was not asked for
  and is not reported; a prediction lacking a reported key counts as wrong; values are
  compared case-insensitively after stripping spaces).

Images are matched by file name (basename). Labels are compared exactly. A category with no
ground truth is reported (its false positives count) but has no AP/recall and is left out of
the means. Ground-truth images without a prediction entry count as images with no detections
and are listed in the report.
"""
import contextlib
import io
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from qwen_vl_perception.data.labels import LabeledImage
from qwen_vl_perception.detection import Box, Detection
from qwen_vl_perception.geometry import iou

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _fraction(part: int, whole: int) -> Optional[float]:
    """``part / whole``, or None when there is nothing to divide by (never a made-up 0)."""
    return part / whole if whole else None


@dataclass
class AttributeAccuracy:
    """How many matched pairs got one attribute right (``missing``: prediction lacked it)."""

    correct: int = 0
    total: int = 0
    missing: int = 0

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.total if self.total else None

    def to_dict(self) -> dict:
        return {'accuracy': self.accuracy, 'correct': self.correct, 'total': self.total,
                'missing': self.missing}


@dataclass
class CategoryMetrics:
    """Metrics of one category. Ratios are None where undefined (e.g. no ground truth)."""

    name: str
    num_ground_truth: int = 0
    num_predictions: int = 0
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    ap50: Optional[float] = None
    ap: Optional[float] = None
    pr_curve: Optional[List[float]] = None
    attributes: Dict[str, AttributeAccuracy] = field(default_factory=dict)

    @property
    def precision(self) -> Optional[float]:
        return _fraction(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> Optional[float]:
        return _fraction(self.true_positives, self.num_ground_truth)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != 'attributes'}
        data['precision'] = self.precision
        data['recall'] = self.recall
        data['attributes'] = {k: v.to_dict() for k, v in self.attributes.items()}
        return data


@dataclass
class EvaluationReport:
    """Everything :func:`evaluate` measured."""

    categories: List[CategoryMetrics]
    iou_threshold: float
    score_threshold: float
    num_images: int
    attributes: Dict[str, AttributeAccuracy] = field(default_factory=dict)
    images_without_predictions: List[str] = field(default_factory=list)
    predictions_without_ground_truth: List[str] = field(default_factory=list)
    ignored_predictions: int = 0

    def _evaluated(self) -> List[CategoryMetrics]:
        return [c for c in self.categories if c.num_ground_truth > 0]

    @property
    def map50(self) -> Optional[float]:
        """Mean AP@0.5 over the categories that have ground truth."""
        values = [c.ap50 for c in self._evaluated()]
        return float(np.mean(values)) if values else None

    @property
    def map(self) -> Optional[float]:
        """Mean AP@[.5:.95] over the categories that have ground truth."""
        values = [c.ap for c in self._evaluated()]
        return float(np.mean(values)) if values else None

    @property
    def true_positives(self) -> int:
        return sum(c.true_positives for c in self.categories)

    @property
    def false_positives(self) -> int:
        return sum(c.false_positives for c in self.categories)

    @property
    def false_negatives(self) -> int:
        return sum(c.false_negatives for c in self.categories)

    @property
    def precision(self) -> Optional[float]:
        """Micro-averaged precision over all categories."""
        return _fraction(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> Optional[float]:
        """Micro-averaged recall over all categories."""
        return _fraction(self.true_positives, self.true_positives + self.false_negatives)

    def category(self, name: str) -> CategoryMetrics:
        for metrics in self.categories:
            if metrics.name == name:
                return metrics
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A JSON-ready dict (None where a ratio is undefined)."""
        return {
            'num_images': self.num_images,
            'iou_threshold': self.iou_threshold,
            'score_threshold': self.score_threshold,
            'map50': self.map50,
            'map': self.map,
            'precision': self.precision,
            'recall': self.recall,
            'true_positives': self.true_positives,
            'false_positives': self.false_positives,
            'false_negatives': self.false_negatives,
            'attributes': {k: v.to_dict() for k, v in self.attributes.items()},
            'categories': [c.to_dict() for c in self.categories],
            'images_without_predictions': list(self.images_without_predictions),
            'predictions_without_ground_truth': list(self.predictions_without_ground_truth),
            'ignored_predictions': self.ignored_predictions,
        }


# --------------------------------------------------------------------------------------------
# Matching


box_iou = iou
"""Intersection over union of two ``(x1, y1, x2, y2)`` boxes (the node's own, from
``geometry``)."""


def match_greedy(ground_truth: Sequence[Box], predictions: Sequence[Tuple[Box, float]],
                 iou_threshold: float) -> List[Optional[int]]:
    """For each prediction (box, score), the index of the ground truth it matched, or None.

    Predictions are visited by descending score (ties keep their order); each takes the
    unmatched ground truth of highest IoU if that IoU is ``>= iou_threshold``.
    """
    order = sorted(range(len(predictions)), key=lambda i: -predictions[i][1])
    taken = [False] * len(ground_truth)
    matches: List[Optional[int]] = [None] * len(predictions)
    for index in order:
        best, best_iou = None, iou_threshold
        for gt_index, gt_box in enumerate(ground_truth):
            if taken[gt_index]:
                continue
            iou = box_iou(predictions[index][0], gt_box)
            if iou >= best_iou:
                if best is None or iou > best_iou:
                    best, best_iou = gt_index, iou
        if best is not None:
            taken[best] = True
            matches[index] = best
    return matches


def _same_value(a: str, b: Optional[str]) -> bool:
    return b is not None and a.strip().lower() == str(b).strip().lower()


# --------------------------------------------------------------------------------------------
# COCO AP


def _coco_ap(images: List[LabeledImage], predictions: Dict[str, List[Detection]],
             names: List[str]) -> Dict[str, Tuple[float, float, List[float]]]:
    """``{category: (ap50, ap, precision at the 101 recall points for IoU 0.5)}``.

    Only categories with ground truth appear. Categories with ground truth but no
    predictions get zeros.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    category_ids = {name: index + 1 for index, name in enumerate(names)}
    gt_images, gt_annotations, results = [], [], []
    max_per_image = 1
    for image_id, image in enumerate(images, start=1):
        gt_images.append({'id': image_id, 'file_name': image.name,
                          'width': image.width, 'height': image.height})
        for obj in image.objects:
            x1, y1, x2, y2 = obj.box
            gt_annotations.append({
                'id': len(gt_annotations) + 1, 'image_id': image_id,
                'category_id': category_ids[obj.label], 'bbox': [x1, y1, x2 - x1, y2 - y1],
                'area': (x2 - x1) * (y2 - y1), 'iscrowd': 0})
        detections = predictions.get(image.name, [])
        max_per_image = max(max_per_image, len(detections))
        for det in detections:
            x1, y1, x2, y2 = det.box
            results.append({'image_id': image_id, 'category_id': category_ids[det.label],
                            'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(det.score)})
    with_gt = sorted({category_ids[a] for a in [o.label for i in images for o in i.objects]})
    id_to_name = {cid: name for name, cid in category_ids.items()}
    zeros = [0.0] * len(RECALL_POINTS)
    if not results:
        return {id_to_name[cid]: (0.0, 0.0, list(zeros)) for cid in with_gt}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        coco_gt = COCO()
        coco_gt.dataset = {'images': gt_images, 'annotations': gt_annotations,
                           'categories': [{'id': cid, 'name': name}
                                          for name, cid in category_ids.items()]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType='bbox')
        evaluator.params.catIds = list(category_ids.values())
        evaluator.params.iouThrs = COCO_IOU_THRESHOLDS.copy()
        evaluator.params.areaRng = [[0.0, 1e10]]
        evaluator.params.areaRngLbl = ['all']
        evaluator.params.maxDets = [max(100, max_per_image)]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval['precision']  # [iou, recall, category, area, max dets]
    result = {}
    for k, cid in enumerate(evaluator.params.catIds):
        if cid not in with_gt:
            continue
        curves = np.clip(precision[:, :, k, 0, -1], 0.0, None)  # -1 means no GT; not here
        per_iou = curves.mean(axis=1)
        result[id_to_name[cid]] = (float(per_iou[0]), float(per_iou.mean()),
                                   [float(v) for v in curves[0]])
    return result


# --------------------------------------------------------------------------------------------
# Entry point


def evaluate(ground_truth: Sequence[LabeledImage], predictions: Mapping[str, List[Detection]],
             categories: Optional[Sequence[str]] = None, iou_threshold: float = 0.5,
             score_threshold: float = 0.0) -> EvaluationReport:
    """Compare ``predictions`` (``{image file name: detections}``) with ``ground_truth``.

    ``categories`` restricts the evaluation to those names (other ground truth and predictions
    are ignored); by default every label seen in either is a category.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f'iou_threshold must be in (0, 1], got {iou_threshold}')
    by_name: Dict[str, List[Detection]] = {}
    for key, detections in predictions.items():
        name = os.path.basename(key)
        if name in by_name:
            raise ValueError(f'two prediction entries for image {name!r}')
        by_name[name] = list(detections)
    seen = set()
    for image in ground_truth:
        if image.name in seen:
            raise ValueError(f'two ground-truth images are named {image.name!r}; images are '
                             'matched by file name, so names must be unique')
        seen.add(image.name)

    if categories is None:
        labels = {o.label for i in ground_truth for o in i.objects}
        labels |= {d.label for name in seen for d in by_name.get(name, [])}
        names = sorted(labels)
    else:
        names = list(dict.fromkeys(categories))
    allowed = set(names)

    ignored = 0
    images: List[LabeledImage] = []
    kept: Dict[str, List[Detection]] = {}
    for image in ground_truth:
        objects = [o for o in image.objects if o.label in allowed]
        images.append(LabeledImage(image.image_path, image.width, image.height, objects))
        detections = by_name.get(image.name, [])
        kept[image.name] = [d for d in detections if d.label in allowed]
        ignored += len(detections) - len(kept[image.name])

    # Only attributes the model was asked for are scored: those that some prediction has.
    predicted_attributes = {key for detections in kept.values() for d in detections
                            for key in d.attributes}
    metrics = {name: CategoryMetrics(name) for name in names}
    overall_attributes: Dict[str, AttributeAccuracy] = {}
    for image in images:
        for name in names:
            gt_objects = [o for o in image.objects if o.label == name]
            dets = [d for d in kept[image.name]
                    if d.label == name and d.score >= score_threshold]
            entry = metrics[name]
            entry.num_ground_truth += len(gt_objects)
            entry.num_predictions += len(dets)
            matches = match_greedy([o.box for o in gt_objects],
                                   [(d.box, d.score) for d in dets], iou_threshold)
            matched = sum(m is not None for m in matches)
            entry.true_positives += matched
            entry.false_positives += len(dets) - matched
            entry.false_negatives += len(gt_objects) - matched
            for det, gt_index in zip(dets, matches):
                if gt_index is None:
                    continue
                for key, value in gt_objects[gt_index].attributes.items():
                    if key not in predicted_attributes:
                        continue  # never asked for (no prediction has it): not scored
                    right = _same_value(value, det.attributes.get(key))
                    for table in (entry.attributes, overall_attributes):
                        counter = table.setdefault(key, AttributeAccuracy())
                        counter.total += 1
                        counter.correct += int(right)
                        counter.missing += int(key not in det.attributes)

    for name, (ap50, ap, curve) in _coco_ap(images, kept, names).items():
        metrics[name].ap50, metrics[name].ap, metrics[name].pr_curve = ap50, ap, curve

    return EvaluationReport(
        categories=[metrics[name] for name in names],
        iou_threshold=float(iou_threshold),
        score_threshold=float(score_threshold),
        num_images=len(images),
        attributes=dict(sorted(overall_attributes.items())),
        images_without_predictions=sorted(n for n in seen if n not in by_name),
        predictions_without_ground_truth=sorted(n for n in by_name if n not in seen),
        ignored_predictions=ignored,
    )


# --------------------------------------------------------------------------------------------
# Presentation


def _ratio(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.3f}'


def format_table(report: EvaluationReport) -> str:
    """A plain-text table of the report for the terminal."""
    header = (f'{"category":<16} {"GT":>5} {"pred":>5} {"TP":>5} {"FP":>5} {"FN":>5} '
              f'{"prec":>6} {"recall":>6} {"AP50":>6} {"AP":>6}')
    lines = [f'{report.num_images} images; precision/recall at IoU >= '
             f'{report.iou_threshold:g}, score >= {report.score_threshold:g}; '
             'AP from COCOeval over all predictions', header, '-' * len(header)]
    for c in report.categories:
        lines.append(f'{c.name[:16]:<16} {c.num_ground_truth:>5} {c.num_predictions:>5} '
                     f'{c.true_positives:>5} {c.false_positives:>5} {c.false_negatives:>5} '
                     f'{_ratio(c.precision):>6} {_ratio(c.recall):>6} {_ratio(c.ap50):>6} '
                     f'{_ratio(c.ap):>6}')
    lines.append('-' * len(header))
    total_gt = sum(c.num_ground_truth for c in report.categories)
    total_pred = sum(c.num_predictions for c in report.categories)
    lines.append(f'{"all (mean AP)":<16} {total_gt:>5} {total_pred:>5} '
                 f'{report.true_positives:>5} {report.false_positives:>5} '
                 f'{report.false_negatives:>5} {_ratio(report.precision):>6} '
                 f'{_ratio(report.recall):>6} {_ratio(report.map50):>6} {_ratio(report.map):>6}')
    if report.attributes:
        lines.append('')
        lines.append('attribute accuracy on matched pairs:')
        for key, counter in report.attributes.items():
            missing = f', {counter.missing} without it' if counter.missing else ''
            lines.append(f'  {key}: {_ratio(counter.accuracy)} '
                         f'({counter.correct}/{counter.total}{missing})')
    if report.predictions_without_ground_truth:
        lines.append(f'note: {len(report.predictions_without_ground_truth)} prediction files '
                     'name images absent from the ground truth (ignored)')
    if report.ignored_predictions:
        lines.append(f'note: {report.ignored_predictions} predictions of other categories '
                     'were ignored')
    return '\n'.join(lines)


def plot_report(report: EvaluationReport, path) -> None:
    """Save a PNG: per-category precision/recall/AP50 bars and PR curves at IoU 0.5."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [c.name for c in report.categories]
    figure = Figure(figsize=(max(8.0, 4.0 + 0.9 * len(names)), 4.5), dpi=100)
    FigureCanvasAgg(figure)
    bars, curves = figure.subplots(1, 2, gridspec_kw={'width_ratios': [3, 2]})
    positions = np.arange(len(names))
    width = 0.27
    series = [('precision', [c.precision for c in report.categories]),
              ('recall', [c.recall for c in report.categories]),
              ('AP@0.5', [c.ap50 for c in report.categories])]
    for offset, (title, values) in enumerate(series):
        bars.bar(positions + (offset - 1) * width, [v or 0.0 for v in values], width,
                 label=title)
    bars.set_xticks(positions)
    bars.set_xticklabels(names, rotation=30, ha='right')
    bars.set_ylim(0.0, 1.2)
    bars.set_title(f'IoU {report.iou_threshold:g}, score >= {report.score_threshold:g}')
    bars.legend(loc='upper center', ncol=3, fontsize='small')
    for c in report.categories:
        if c.pr_curve is not None:
            curves.plot(RECALL_POINTS, c.pr_curve, label=f'{c.name} ({c.ap50:.2f})')
    curves.set_xlim(0.0, 1.0)
    curves.set_ylim(0.0, 1.05)
    curves.set_xlabel('recall')
    curves.set_ylabel('precision')
    curves.set_title('PR curves, IoU 0.5 (COCO)')
    if any(c.pr_curve is not None for c in report.categories):
        curves.legend(loc='lower left', fontsize='small')
    figure.tight_layout()
    figure.savefig(os.fspath(path), format='png')
