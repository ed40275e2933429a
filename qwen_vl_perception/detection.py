"""The data that flows between the core's stages: parsed model objects and final detections."""
from dataclasses import dataclass, field
from typing import Dict, Tuple

DEFAULT_ATTRIBUTES = ('color', 'shape', 'appearance')
"""The attributes asked for each object by default: those of the inference script in the blog
post the project grew from ("Qwen3-VL + LoRA SFT + 4-bit quantization", see README.md)."""

Box = Tuple[float, float, float, float]
"""An axis-aligned box ``(x1, y1, x2, y2)`` with ``x1 <= x2`` and ``y1 <= y2``."""


@dataclass
class ParsedObject:
    """One object as the model wrote it, before it is mapped into image pixels.

    ``box`` is in the model's coordinate convention (for Qwen3-VL: the 0-1000 grid).
    ``span`` is the ``[start, end)`` character range of the object's text in the raw model
    output, used to find the tokens the object was generated from (its score).
    """

    label: str
    box: Box
    attributes: Dict[str, str] = field(default_factory=dict)
    span: Tuple[int, int] = (0, 0)


@dataclass
class Detection:
    """One detected object in source-image pixels."""

    label: str
    box: Box
    score: float
    attributes: Dict[str, str] = field(default_factory=dict)
    id: str = ''

    @property
    def center(self) -> Tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0

    @property
    def size(self) -> Tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return x2 - x1, y2 - y1
