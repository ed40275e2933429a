"""What :func:`~qwen_vl_perception.data.evaluation.evaluate` returns: per-category and overall
counts and ratios, and their JSON form (None where a ratio is undefined, never a made-up 0)."""
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np


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
