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

The package's modules: ``comparison`` (matching, the counts, :func:`evaluate`), ``coco_ap``
(AP through pycocotools), ``report`` (the report types) and ``presentation`` (table, plot).
"""
from .comparison import box_iou, evaluate, match_greedy
from .presentation import format_table, plot_report
from .report import AttributeAccuracy, CategoryMetrics, EvaluationReport

__all__ = ['AttributeAccuracy', 'CategoryMetrics', 'EvaluationReport', 'box_iou', 'evaluate',
           'format_table', 'match_greedy', 'plot_report']
