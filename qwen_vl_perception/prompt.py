"""The instruction sent to Qwen3-VL, the chat messages around it, and the answer it is taught.

The same instruction text is used at inference (``build_messages``) and in training data
(``training_user_text`` + ``format_answer``), so a fine-tuned model sees what it was trained on.
"""
import json
import re
import string
from typing import Dict, Iterable, List, Sequence

from .categories import normalize_categories
from .detection import DEFAULT_ATTRIBUTES, ParsedObject
from .geometry import GRID_MAX
from .parsing import BOX_KEYS, CORNER_KEYS, LABEL_KEYS

IMAGE_PLACEHOLDER = '<image>'
"""The image tag of LLaMA-Factory's sharegpt data (one per image)."""

TEMPLATE_FIELDS = ('categories', 'attributes')

_RESERVED_KEYS = BOX_KEYS + LABEL_KEYS + CORNER_KEYS
_ATTRIBUTE_NAME = re.compile(r'^[a-z][a-z0-9_]{0,31}$')

_GROUNDING = ('locate every instance that belongs to the following categories: '
              '"{categories}".')
_REPORT = ' Report bbox coordinates in JSON format.'


class PromptBuilder:
    """Builds the instruction for a set of categories, once, at construction.

    ``describe`` also asks for a short description of each object (``attributes``) and shows
    the exact JSON to answer with. ``template`` replaces the instruction: a ``str.format``
    template that must contain ``{categories}`` (the names joined by ", ") and may contain
    ``{attributes}`` (the attribute names joined by ", "); literal braces are written ``{{``
    and ``}}``.
    """

    def __init__(self, categories: Iterable[str], describe: bool = False, template=None,
                 attributes: Sequence[str] = DEFAULT_ATTRIBUTES):
        self.categories: List[str] = normalize_categories(categories)
        self.describe = bool(describe)
        self.attributes = normalize_attributes(attributes)
        if self.describe and not self.attributes:
            raise ValueError('describe=True needs at least one attribute to ask for')
        if template is None:
            self.instruction = default_instruction(
                self.categories, self.attributes if self.describe else ())
        else:
            self.instruction = render_template(template, self.categories, self.attributes)

    @property
    def answer_attributes(self) -> tuple:
        """The attribute keys the model is asked to write (none unless ``describe``)."""
        return self.attributes if self.describe else ()

    def messages(self) -> List[Dict]:
        """The chat messages for one frame (see ``build_messages``)."""
        return build_messages(self.instruction)

    def __repr__(self) -> str:
        return (f'PromptBuilder(categories={self.categories!r}, describe={self.describe!r}, '
                f'attributes={self.attributes!r})')


def normalize_attributes(attributes: Sequence[str]) -> tuple:
    """Validate attribute names: lower-case identifiers, not a box/label key, no duplicates."""
    if isinstance(attributes, str):
        raise ValueError(f'attributes must be a list of names, got the string {attributes!r}')
    result = []
    for value in attributes:
        if not isinstance(value, str):
            raise ValueError(f'attribute names must be strings, got {value!r}')
        name = value.strip().lower()
        if not _ATTRIBUTE_NAME.match(name):
            raise ValueError(
                f'attribute {value!r} must be a short identifier: a letter, then letters, '
                'digits or "_"')
        if name in _RESERVED_KEYS:
            raise ValueError(f'attribute {value!r} clashes with the box/label keys')
        if name not in result:
            result.append(name)
    return tuple(result)


def default_instruction(categories: Sequence[str], attributes: Sequence[str] = ()) -> str:
    """Qwen3-VL's official grounding prompt; with attributes, also the exact answer format."""
    text = _GROUNDING.format(categories=', '.join(categories))
    if not attributes:
        return text + _REPORT
    example = {'bbox_2d': '[x1, y1, x2, y2]', 'label': '"<category>"'}
    example.update((name, '"..."') for name in attributes)
    fields = ', '.join(f'"{key}": {value}' for key, value in example.items())
    return (text
            + f' For each instance also describe its {_join_words(attributes)} in a few words.'
            + f' Report bbox coordinates as integers on a 0-{GRID_MAX} grid'
            + ' and answer only with JSON in this format: [{' + fields + '}]')


def render_template(template: str, categories: Sequence[str],
                    attributes: Sequence[str]) -> str:
    """Fill a user template, refusing unknown placeholders with a reason."""
    if not isinstance(template, str):
        raise ValueError(f'template must be a string, got {type(template).__name__}')
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as error:
        raise ValueError(
            f'template is not a valid format string ({error}); write literal braces as '
            '"{{" and "}}"') from None
    for field in fields:
        if field not in TEMPLATE_FIELDS:
            shown = '{' + field + '}'
            raise ValueError(
                f'template placeholder {shown} is not allowed; use {{categories}} and '
                'optionally {attributes} (literal braces are written "{{" and "}}")')
    if 'categories' not in fields:
        raise ValueError('template must contain {categories}')
    try:
        text = template.format(categories=', '.join(categories),
                               attributes=', '.join(attributes))
    except (ValueError, IndexError, KeyError) as error:
        raise ValueError(f'template cannot be filled: {error}') from None
    if IMAGE_PLACEHOLDER in text or '<|' in text:
        raise ValueError(f'template must not contain {IMAGE_PLACEHOLDER} or special tokens')
    if not text.strip():
        raise ValueError('template gives an empty instruction')
    return text


def _join_words(words: Sequence[str]) -> str:
    words = [word.replace('_', ' ') for word in words]
    if len(words) == 1:
        return words[0]
    return ', '.join(words[:-1]) + ' and ' + words[-1]


def build_messages(instruction: str) -> List[Dict]:
    """One user turn: the instruction text first, then the image.

    Text before the image keeps the token prefix identical for every frame, so the KV cache of
    the instruction can be reused. ``training_user_text`` mirrors this order for training data.
    """
    return [{'role': 'user',
             'content': [{'type': 'text', 'text': instruction}, {'type': 'image'}]}]


def training_user_text(instruction: str) -> str:
    """The user message of LLaMA-Factory sharegpt data: the instruction, then ``<image>``.

    Mirrors ``build_messages``: Qwen's chat template writes a text item and then the image's
    vision tokens with nothing in between, which is what LLaMA-Factory makes of
    ``instruction + "<image>"``.
    """
    if IMAGE_PLACEHOLDER in instruction:
        raise ValueError(f'the instruction must not contain {IMAGE_PLACEHOLDER}')
    return instruction + IMAGE_PLACEHOLDER


def format_answer(objects: Iterable[ParsedObject], attributes: Sequence[str] = ()) -> str:
    """The answer Qwen3-VL writes natively, for training data.

    A ```json fenced list, one object per line: ``bbox_2d`` (integer grid coordinates), then
    ``label``, then each of ``attributes`` that the object has (missing or empty ones are left
    out). Boxes must already be on the 0..1000 grid; ``parse_objects`` reads this back exactly.
    """
    lines = []
    for obj in objects:
        box = _grid_box(obj.box)
        fields = [f'"bbox_2d": [{box[0]}, {box[1]}, {box[2]}, {box[3]}]',
                  '"label": ' + json.dumps(obj.label, ensure_ascii=False)]
        for name in attributes:
            value = obj.attributes.get(name)
            if value is not None and str(value).strip():
                fields.append(json.dumps(name) + ': '
                              + json.dumps(str(value).strip(), ensure_ascii=False))
        lines.append('  {' + ', '.join(fields) + '}')
    if not lines:
        return '```json\n[]\n```'
    return '```json\n[\n' + ',\n'.join(lines) + '\n]\n```'


def _grid_box(box) -> tuple:
    values = []
    for value in box:
        number = float(value)
        if not 0 <= number <= GRID_MAX:  # also false for NaN
            raise ValueError(f'box {tuple(box)} is not on the 0..{GRID_MAX} grid')
        values.append(int(round(number)))
    if len(values) != 4:
        raise ValueError(f'box {tuple(box)} must have 4 coordinates')
    x1, y1, x2, y2 = values
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)
