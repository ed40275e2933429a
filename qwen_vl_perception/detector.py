"""From images to detections: prompt, model, parser, coordinates and scores in one place.

The node and the folder tool both use :class:`Detector`, so they prompt and parse identically.
Settings that change at runtime (categories, attributes, thresholds, ...) are held in an
immutable :class:`PreparedSettings` that is swapped atomically: a frame in flight finishes with
the settings it started with.
"""
import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

from .categories import LabelMatcher
from .detection import DEFAULT_ATTRIBUTES, Detection
from .geometry import CONVENTIONS, GRID_1000, deduplicate, is_degenerate, to_pixels
from .parsing import parse_objects
from .prompt import PromptBuilder
from .scoring import object_score


@dataclass(frozen=True)
class DetectionSettings:
    """Everything that decides what is asked and what is kept, changeable between frames."""

    categories: Tuple[str, ...]
    describe: bool = True
    attributes: Tuple[str, ...] = DEFAULT_ATTRIBUTES
    prompt_template: Optional[str] = None
    coordinate_convention: str = GRID_1000
    score_threshold: float = 0.0
    max_new_tokens: int = 512
    dedupe_iou: float = 0.7
    min_box_size: float = 1.0

    def with_changes(self, **changes) -> 'DetectionSettings':
        return replace(self, **changes)


@dataclass(frozen=True)
class PreparedSettings:
    """Settings plus what is derived from them once, not per frame."""

    settings: DetectionSettings
    prompt: PromptBuilder
    matcher: LabelMatcher

    @property
    def instruction(self) -> str:
        return self.prompt.instruction


def prepare_settings(settings: DetectionSettings) -> PreparedSettings:
    """Validate ``settings`` and build the prompt and label matcher; ValueError with a reason."""
    if settings.coordinate_convention not in CONVENTIONS:
        raise ValueError(f'coordinate_convention must be one of {", ".join(CONVENTIONS)}, '
                         f'not {settings.coordinate_convention!r}')
    if not 0.0 <= settings.score_threshold <= 1.0:
        raise ValueError('score_threshold must lie in [0, 1]')
    if settings.max_new_tokens < 1:
        raise ValueError('max_new_tokens must be at least 1')
    if not 0.0 < settings.dedupe_iou <= 1.0:
        raise ValueError('dedupe_iou must lie in (0, 1]')
    prompt = PromptBuilder(settings.categories, describe=settings.describe,
                           template=settings.prompt_template or None,
                           attributes=tuple(settings.attributes))
    settings = replace(settings, categories=tuple(prompt.categories))
    return PreparedSettings(settings=settings, prompt=prompt,
                            matcher=LabelMatcher(prompt.categories))


@dataclass
class FrameDetections:
    """The outcome of one frame, with what was dropped and why (for counters and logs)."""

    detections: List[Detection]
    raw_text: str = ''
    unknown_labels: List[str] = field(default_factory=list)
    invalid: int = 0
    truncated: bool = False
    below_threshold: int = 0
    degenerate: int = 0
    duplicates: int = 0
    excess: int = 0
    """Objects beyond the parser's cap per answer (:data:`~.parsing.MAX_OBJECTS`), dropped."""
    seconds: float = 0.0
    describe: bool = False
    """Whether this frame was asked for attributes (settings may change while in flight)."""


def detections_from_text(text: str, prepared: PreparedSettings,
                         source_size: Tuple[int, int],
                         model_input_size: Optional[Tuple[int, int]] = None,
                         token_offsets: Sequence[Tuple[int, int]] = (),
                         token_probs: Sequence[float] = ()) -> FrameDetections:
    """Turn one model answer into pixel detections of an image of ``source_size`` (w, h).

    Scores come from the token probabilities (see :func:`scoring.span_score`); without them
    (text from elsewhere) every score is 1.0.
    """
    settings = prepared.settings
    parsed = parse_objects(text, prepared.matcher, attribute_keys=settings.attributes)
    result = FrameDetections(detections=[], raw_text=text,
                             unknown_labels=list(parsed.unknown_labels),
                             invalid=parsed.invalid, truncated=parsed.truncated,
                             excess=parsed.excess, describe=settings.describe)
    candidates = []
    for obj in parsed.objects:
        box = to_pixels(obj.box, settings.coordinate_convention, source_size, model_input_size)
        if is_degenerate(box, settings.min_box_size):
            result.degenerate += 1
            continue
        score = (object_score(text, obj.span, token_offsets, token_probs) if token_probs
                 else 1.0)
        if score < settings.score_threshold:
            result.below_threshold += 1
            continue
        candidates.append(Detection(label=obj.label, box=box, score=score,
                                    attributes=dict(obj.attributes)))
    kept = deduplicate(candidates, settings.dedupe_iou)
    result.duplicates = len(candidates) - len(kept)
    for index, detection in enumerate(kept):
        detection.id = str(index)
    result.detections = kept
    return result


class Detector:
    """Runs the model on frames and returns detections.

    One caller at a time for ``detect``, unless the engine says it takes several at once
    (``engine.concurrent``, the served model's engine): then calls run side by side.
    """

    def __init__(self, engine, settings: DetectionSettings):
        self._engine = engine
        self._prepared = prepare_settings(settings)
        self._lock = (contextlib.nullcontext() if getattr(engine, 'concurrent', False)
                      else threading.Lock())

    @property
    def engine(self):
        """The engine the detector runs (read-only)."""
        return self._engine

    @property
    def prepared(self) -> PreparedSettings:
        return self._prepared

    @property
    def settings(self) -> DetectionSettings:
        return self._prepared.settings

    def update(self, settings: DetectionSettings) -> PreparedSettings:
        """Validate and switch to new settings (takes effect from the next frame)."""
        prepared = prepare_settings(settings)
        self._prepared = prepared
        return prepared

    def detect(self, images: Sequence, prepared: Optional[PreparedSettings] = None,
               on_step=None) -> List[FrameDetections]:
        """Detect objects in RGB ``images`` (HxWx3 uint8), decoded together as one batch.

        ``prepared``: settings for this call only (an on-demand request), else the current
        ones. ``on_step``: the engine's per-token hook
        (:data:`~qwen_vl_perception.model.generation.StepHook`); False from it stops
        decoding, and what was answered so far is parsed.
        """
        prepared = prepared or self._prepared
        hook = {} if on_step is None else {'on_step': on_step}
        with self._lock:
            started = time.perf_counter()
            generations = self._engine.generate(list(images), prepared.instruction,
                                                prepared.settings.max_new_tokens, **hook)
            seconds = time.perf_counter() - started
        results = []
        for image, generation in zip(images, generations):
            height, width = image.shape[:2]
            frame = detections_from_text(
                generation.text, prepared, (width, height),
                model_input_size=generation.model_input_size,
                token_offsets=generation.token_offsets, token_probs=generation.token_probs)
            frame.seconds = seconds
            results.append(frame)
        return results
