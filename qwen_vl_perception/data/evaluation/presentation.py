"""The evaluation's presentation: a plain-text table for the terminal and a PNG of the
per-category figures and PR curves (matplotlib, imported on first use)."""
import os
from typing import Optional

import numpy as np

from .coco_ap import RECALL_POINTS
from .report import EvaluationReport


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
