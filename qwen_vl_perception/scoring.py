"""Detection scores from the probabilities of the tokens an object was generated from.

A VLM gives no detector-style confidence. Under greedy decoding, the answer is the most likely
continuation, and the probability the model gave each chosen token says how sure it was of it.
The product of the probabilities of an object's tokens is the probability of emitting exactly
that object (its box digits, its label) given what came before; the geometric mean normalises
that for length, so a long label is not penalised, and gives a score in [0, 1] with the
meaning "typical per-token confidence". One doubtful token (a box digit, the label) lowers it.

Only the tokens that carry the object's content count (:func:`value_spans`: the box numbers and
the label's text). The JSON punctuation and key names around them are near-certain for any
fine-tuned model; counting them would pull every score towards 1 and flatten the differences
between a sure and a doubtful object.
"""
import bisect
import math
import re
from typing import List, Sequence, Tuple

from .detection import ParsedObject

Span = Tuple[int, int]


def span_score(span: Span, token_offsets: Sequence[Span],
               token_probs: Sequence[float]) -> float:
    """Geometric mean of the probabilities of the tokens whose text overlaps ``span``.

    ``token_offsets`` are the ``[start, end)`` character ranges of the generated tokens in the
    decoded answer, ``token_probs`` the probability of each chosen token. A zero-width token
    counts when it sits inside the span. Returns 0.0 when no token overlaps.
    """
    if len(token_offsets) != len(token_probs):
        raise ValueError(f'{len(token_offsets)} token offsets but {len(token_probs)} '
                         'probabilities')
    start, end = span
    log_sum = 0.0
    count = 0
    for (token_start, token_end), probability in zip(token_offsets, token_probs):
        if not _overlaps(start, end, token_start, token_end):
            continue
        if not probability > 0.0:  # zero, negative or NaN
            return 0.0
        log_sum += math.log(min(float(probability), 1.0))
        count += 1
    return math.exp(log_sum / count) if count else 0.0


_NUMBER = re.compile(r'(?<![\w.])\d+(?:\.\d+)?(?!\w)')  # not the 2 of "bbox_2d"
_LABEL_VALUE = re.compile(r"""["']?(?:label|category|name)["']?\s*:\s*["']([^"'\n]*)["']""",
                          re.IGNORECASE)


def value_spans(text: str, span: Span) -> List[Span]:
    """The character ranges, inside ``text[span[0]:span[1]]``, of the object's box numbers and
    label value (offsets into ``text``)."""
    start, end = span
    body = text[start:end]
    spans = [(start + m.start(), start + m.end()) for m in _NUMBER.finditer(body)]
    spans += [(start + m.start(1), start + m.end(1)) for m in _LABEL_VALUE.finditer(body)
              if m.end(1) > m.start(1)]
    return sorted(spans)


def object_score(text: str, span: Span, token_offsets: Sequence[Span],
                 token_probs: Sequence[float]) -> float:
    """The score of the object written at ``span`` of ``text``: the geometric mean of the
    probabilities of the tokens that overlap its box numbers or label value (each token once);
    the whole span when neither is found."""
    values = value_spans(text, span)
    if not values:
        return span_score(span, token_offsets, token_probs)
    chosen_offsets, chosen_probs = [], []
    for offset, probability in zip(token_offsets, token_probs):
        if any(_overlaps(s, e, offset[0], offset[1]) for s, e in values):
            chosen_offsets.append(offset)
            chosen_probs.append(probability)
    return span_score(span, chosen_offsets, chosen_probs)


def object_scores(objects: Sequence[ParsedObject], token_offsets: Sequence[Span],
                  token_probs: Sequence[float]) -> List[float]:
    """``span_score`` of each object's span, in order.

    When the offsets are sorted (as a decoder produces them), only the tokens near each span
    are visited.
    """
    if len(token_offsets) != len(token_probs):
        raise ValueError(f'{len(token_offsets)} token offsets but {len(token_probs)} '
                         'probabilities')
    starts = [offset[0] for offset in token_offsets]
    ends = [offset[1] for offset in token_offsets]
    if any(a > b for a, b in zip(starts, starts[1:])) or any(
            a > b for a, b in zip(ends, ends[1:])):
        return [span_score(obj.span, token_offsets, token_probs) for obj in objects]
    scores = []
    for obj in objects:
        start, end = obj.span
        # First token that ends after the span starts (or, zero-width, at its start) ...
        first = bisect.bisect_left(ends, start)
        # ... up to the last token that starts before the span ends.
        last = bisect.bisect_left(starts, end, lo=first)
        scores.append(span_score(obj.span, token_offsets[first:last], token_probs[first:last]))
    return scores


def _overlaps(start: int, end: int, token_start: int, token_end: int) -> bool:
    if token_start == token_end:
        return start <= token_start < end
    return max(start, token_start) < min(end, token_end)
