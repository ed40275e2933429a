"""Reading detected objects out of a model's free-text answer, whatever state it is in.

``parse_objects`` never raises. It finds each balanced top-level ``{...}`` in the text (quotes
inside JSON strings do not count), decodes it as JSON (or, failing that, as JSON with single
quotes, trailing commas or Python literals), and keeps those with a usable box and a label that
names an allowed category. Code fences, prose around the JSON, a missing list, and an answer cut
off mid-object (the incomplete object is dropped) are all fine.

What it returns can always be published: text is valid Unicode (a lone surrogate, which JSON's
``\\ud83d`` can write and UTF-8 cannot encode, becomes U+FFFD), an attribute nested deeper
than :data:`MAX_ATTRIBUTE_DEPTH` makes its object invalid (counted), and at most
:data:`MAX_OBJECTS` objects are kept per answer (the rest are counted as ``excess``), so that
de-duplicating them stays cheap.
"""
import json
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .categories import LabelMatcher
from .detection import DEFAULT_ATTRIBUTES, ParsedObject

DEFAULT_ATTRIBUTE_KEYS = DEFAULT_ATTRIBUTES
BOX_KEYS = ('bbox_2d', 'bbox', 'box', 'box_2d', 'bounding_box', 'bbox2d')
LABEL_KEYS = ('label', 'category', 'name', 'class')
CORNER_KEYS = ('x1', 'y1', 'x2', 'y2')
NESTED_ATTRIBUTE_KEYS = ('attributes', 'attrs', 'properties', 'description')

_MAX_NESTING = 3
MAX_ATTRIBUTE_DEPTH = 8
"""Deepest list nesting read in an attribute value; deeper makes the object invalid."""
MAX_OBJECTS = 256
"""Most objects kept from one answer; an answer of the longest ``max_new_tokens`` (8192)
holds fewer. The rest are counted in :attr:`ParseResult.excess`."""
_SURROGATE = re.compile('[\ud800-\udfff]')
_NUMBER = re.compile(r'[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?')
_OUTSIDE = re.compile(r'[{\[\]]')
_INSIDE = re.compile(r'[{}"\']')
_DOUBLE_QUOTED_END = re.compile(r'["\\\n]')
_SINGLE_QUOTED_END = re.compile(r"['\\\n]")
_PYTHON_LITERALS = {'True': 'true', 'False': 'false', 'None': 'null'}


@dataclass
class ParseResult:
    """What a model answer contained.

    ``objects``: the usable objects, in answer order. ``unknown_labels``: label text of objects
    dropped because the label is not an allowed category. ``invalid``: objects dropped for a
    missing or malformed box or label (or undecodable text). ``truncated``: the answer stops
    inside an object, an open list or an open code fence. ``excess``: usable objects dropped
    because the answer already gave :data:`MAX_OBJECTS`.
    """

    objects: List[ParsedObject] = field(default_factory=list)
    unknown_labels: List[str] = field(default_factory=list)
    invalid: int = 0
    truncated: bool = False
    excess: int = 0


def parse_objects(text: str, matcher: LabelMatcher,
                  attribute_keys: Sequence[str] = DEFAULT_ATTRIBUTE_KEYS) -> ParseResult:
    """Parse a model answer into objects; never raises (a broken answer gives fewer objects)."""
    result = ParseResult()
    try:
        if not isinstance(text, str):
            return result
        keys = tuple((str(key), str(key).casefold()) for key in attribute_keys)
        result.truncated = _parse_region(text, 0, len(text), matcher, keys, result, 0)
        result.truncated = result.truncated or text.count('```') % 2 == 1
    except Exception:  # noqa: BLE001 - the contract is to never raise on model text
        pass  # keep what was parsed before the unexpected error
    return result


def _parse_region(text: str, begin: int, end: int, matcher: LabelMatcher,
                  attribute_keys, result: ParseResult, nesting: int) -> bool:
    """Parse the top-level objects of ``text[begin:end]``; return whether it ends unfinished."""
    spans, open_start, open_list = _scan_objects(text, begin, end)
    for start, stop, broken in spans:
        if broken:
            if nesting == 0:
                result.invalid += 1
            continue
        found = _decode_object(text[start:stop])
        if found is not None and _add_object(found, (start, stop), matcher, attribute_keys,
                                             result):
            continue
        # Not an object itself: maybe a wrapper such as {"objects": [{...}, ...]}.
        before = len(result.objects) + len(result.unknown_labels)
        if nesting < _MAX_NESTING:
            _parse_region(text, start + 1, stop - 1, matcher, attribute_keys, result,
                          nesting + 1)
        if nesting == 0 and len(result.objects) + len(result.unknown_labels) == before:
            result.invalid += 1
    if open_start is not None:
        # Cut off inside an object: keep any complete objects nested in what was written.
        if nesting < _MAX_NESTING:
            _parse_region(text, open_start + 1, end, matcher, attribute_keys, result,
                          nesting + 1)
        return True
    return open_list


def _scan_objects(text: str, begin: int, end: int):
    """Find the balanced top-level ``{...}`` spans of ``text[begin:end]``.

    Returns ``(spans, open_start, open_list)``: ``spans`` are ``(start, stop, broken)`` with
    ``broken`` set when a string inside ran into a line break (JSON strings are one line; the
    scan gives that object up and resumes at the line break, so one bad object cannot swallow
    the rest); ``open_start`` is where an object that never closed begins; ``open_list`` tells
    whether a ``[`` outside objects was left open.
    """
    spans: List[Tuple[int, int, bool]] = []
    depth = 0
    list_depth = 0
    start = 0
    index = begin
    while True:
        found = (_OUTSIDE if depth == 0 else _INSIDE).search(text, index, end)
        if found is None:
            break
        index = found.start()
        character = text[index]
        if depth == 0:
            if character == '{':
                depth, start = 1, index
            elif character == '[':
                list_depth += 1
            elif list_depth > 0:  # ']'
                list_depth -= 1
            index += 1
            continue
        if character in '"\'':
            closing = _string_end(text, index, end)
            if closing is None:  # cut off inside a string
                return spans, start, list_depth > 0
            if text[closing] != character:  # a line break inside a string
                spans.append((start, closing, True))
                depth = 0
                index = closing
                continue
            index = closing + 1
            continue
        if character == '{':
            depth += 1
        else:  # '}'
            depth -= 1
            if depth == 0:
                spans.append((start, index + 1, False))
        index += 1
    return spans, (start if depth > 0 else None), list_depth > 0


def _string_end(text: str, opening: int, end: int) -> Optional[int]:
    """Index of the quote closing the string at ``opening``, of a line break, or None."""
    pattern = _DOUBLE_QUOTED_END if text[opening] == '"' else _SINGLE_QUOTED_END
    index = opening + 1
    while True:
        found = pattern.search(text, index, end)
        if found is None:
            return None
        index = found.start()
        if text[index] != '\\':
            return index
        index += 2


def _decode_object(chunk: str) -> Optional[dict]:
    for candidate in (chunk, _repair_json(chunk)):
        try:
            value = json.loads(candidate)
        except Exception:  # noqa: BLE001 - ValueError, RecursionError, ...
            continue
        return value if isinstance(value, dict) else None
    return None


def _repair_json(chunk: str) -> str:
    """Rewrite near-JSON as JSON: single-quoted strings, trailing commas, True/False/None."""
    out = []
    index = 0
    length = len(chunk)
    while index < length:
        character = chunk[index]
        if character in '"\'':
            closing = _string_end(chunk, index, length)
            if closing is None or chunk[closing] != character:
                return chunk
            out.append(_requote(chunk[index + 1:closing], character))
            index = closing + 1
        elif character == ',':
            following = index + 1
            while following < length and chunk[following] in ' \t\r\n':
                following += 1
            if following < length and chunk[following] in '}]':
                index = following
            else:
                out.append(character)
                index += 1
        elif character.isalpha():
            following = index
            while following < length and (chunk[following].isalnum()
                                          or chunk[following] == '_'):
                following += 1
            word = chunk[index:following]
            out.append(_PYTHON_LITERALS.get(word, word))
            index = following
        else:
            out.append(character)
            index += 1
    return ''.join(out)


def _requote(content: str, quote: str) -> str:
    """``content`` of a string quoted with ``quote`` as a double-quoted JSON string."""
    out = ['"']
    index = 0
    while index < len(content):
        character = content[index]
        if character == '\\' and index + 1 < len(content):
            escaped = content[index + 1]
            out.append(escaped if escaped == "'" else character + escaped)
            index += 2
            continue
        out.append('\\"' if character == '"' else character)
        index += 1
    out.append('"')
    return ''.join(out)


def _add_object(found: dict, span: Tuple[int, int], matcher: LabelMatcher, attribute_keys,
                result: ParseResult) -> bool:
    """Add one decoded object to ``result``; False when it has no usable box or label."""
    fields = _casefold_keys(found)
    box = None
    for key in BOX_KEYS:
        if key in fields:
            box = _read_box(fields[key])
            break
    if box is None:
        box = _read_box({key: fields[key] for key in CORNER_KEYS if key in fields})
    label = None
    for key in LABEL_KEYS:
        value = fields.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            label = _valid_text(str(value)).strip()
            if label:
                break
    if box is None or not label:
        return False
    category = matcher.match(label)
    if category is None:
        result.unknown_labels.append(label)
        return True
    try:
        attributes = _read_attributes(fields, attribute_keys)
    except _TooDeep:
        return False
    if len(result.objects) >= MAX_OBJECTS:
        result.excess += 1
        return True
    x1, y1, x2, y2 = box
    result.objects.append(ParsedObject(
        label=category,
        box=(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)),
        attributes=attributes,
        span=span))
    return True


def _casefold_keys(found: dict) -> Dict[str, object]:
    fields: Dict[str, object] = {}
    for key, value in found.items():
        fields.setdefault(str(key).strip().casefold(), value)
    return fields


def _read_box(value) -> Optional[Tuple[float, float, float, float]]:
    """Four finite numbers from a list, a pair of points, a dict or a string; else None."""
    if isinstance(value, dict):
        value = _casefold_keys(value)
        value = [value.get(key) for key in CORNER_KEYS]
    elif isinstance(value, str):
        value = _NUMBER.findall(value)
    if not isinstance(value, (list, tuple)):
        return None
    if len(value) == 2 and all(isinstance(point, (list, tuple)) and len(point) == 2
                               for point in value):
        value = [value[0][0], value[0][1], value[1][0], value[1][1]]
    if len(value) != 4:
        return None
    numbers = [_read_number(item) for item in value]
    if any(number is None for number in numbers):
        return None
    return tuple(numbers)


def _read_number(value) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _read_attributes(fields: Dict[str, object], attribute_keys) -> Dict[str, str]:
    nested: Dict[str, object] = {}
    for key in NESTED_ATTRIBUTE_KEYS:
        if isinstance(fields.get(key), dict):
            nested = _casefold_keys(fields[key])
            break
    attributes: Dict[str, str] = {}
    for name, folded in attribute_keys:
        value = fields.get(folded, nested.get(folded))
        text = _attribute_text(value)
        if text:
            attributes[name] = text
    return attributes


class _TooDeep(ValueError):
    """An attribute value nested deeper than :data:`MAX_ATTRIBUTE_DEPTH`."""


def _attribute_text(value, depth: int = 0) -> str:
    if depth > MAX_ATTRIBUTE_DEPTH:
        raise _TooDeep()
    if value is None:
        return ''
    if isinstance(value, str):
        return _valid_text(value).strip()
    if isinstance(value, (list, tuple)):
        return ', '.join(_attribute_text(item, depth + 1) for item in value
                         if item is not None).strip()
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, dict):  # written as it is, once its depth is known to be bounded
        for item in value.values():
            _attribute_text(item, depth + 1)
    return _valid_text(str(value)).strip()


def _valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so that it encodes as UTF-8."""
    return _SURROGATE.sub('\ufffd', text)
