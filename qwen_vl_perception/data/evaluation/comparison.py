"""Precision, recall and attribute accuracy of predictions against ground truth: greedy
matching per image and category, the counts, and the report (AP comes from ``coco_ap``)."""
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from qwen_vl_perception.data.labels import LabeledImage
from qwen_vl_perception.detection import Box, Detection
from qwen_vl_perception.geometry import iou

from .coco_ap import coco_ap
from .report import AttributeAccuracy, CategoryMetrics, EvaluationReport


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

    for name, (ap50, ap, curve) in coco_ap(images, kept, names).items():
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
