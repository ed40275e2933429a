"""The instruction, the chat messages and the training answer format."""
import json

import pytest

from qwen_vl_perception.categories import LabelMatcher
from qwen_vl_perception.detection import ParsedObject
from qwen_vl_perception.parsing import parse_objects
from qwen_vl_perception.prompt import (
    DEFAULT_ATTRIBUTES, IMAGE_PLACEHOLDER, PromptBuilder, build_messages, format_answer,
    training_user_text)


def test_default_instruction_is_qwen3_official_grounding_prompt():
    builder = PromptBuilder(['cup', 'table'])
    assert builder.instruction == (
        'locate every instance that belongs to the following categories: "cup, table". '
        'Report bbox coordinates in JSON format.')
    assert builder.categories == ['cup', 'table']
    assert builder.describe is False
    assert builder.attributes == DEFAULT_ATTRIBUTES
    assert builder.answer_attributes == ()


def test_builder_normalises_categories():
    builder = PromptBuilder([' cup', 'Cup', 'coffee   table'])
    assert builder.categories == ['cup', 'coffee table']
    assert '"cup, coffee table"' in builder.instruction


def test_builder_rejects_bad_categories():
    with pytest.raises(ValueError, match='would break the prompt'):
        PromptBuilder(['cup', 'a "quoted" thing'])
    with pytest.raises(ValueError, match='empty'):
        PromptBuilder([])


def test_describe_instruction_shows_the_exact_answer_template():
    builder = PromptBuilder(['cup', 'table'], describe=True)
    text = builder.instruction
    assert text.startswith('locate every instance that belongs to the following categories: '
                           '"cup, table".')
    assert ('[{"bbox_2d": [x1, y1, x2, y2], "label": "<category>", "color": "...", '
            '"shape": "...", "appearance": "..."}]') in text
    assert '0-1000' in text
    assert 'only with JSON' in text
    assert builder.answer_attributes == DEFAULT_ATTRIBUTES


def test_describe_with_custom_attributes():
    builder = PromptBuilder(['cup'], describe=True, attributes=['Material', 'color', 'color'])
    assert builder.attributes == ('material', 'color')
    assert '"material": "...", "color": "..."}]' in builder.instruction
    assert 'shape' not in builder.instruction


@pytest.mark.parametrize('attributes, reason', [
    (['label'], 'clashes'),
    (['bbox_2d'], 'clashes'),
    (['name'], 'clashes'),
    (['x1'], 'clashes'),
    (['two words'], 'identifier'),
    (['1st'], 'identifier'),
    ([''], 'identifier'),
    ([3], 'must be strings'),
    ('color', 'list of names'),
])
def test_bad_attributes_are_rejected(attributes, reason):
    with pytest.raises(ValueError, match=reason):
        PromptBuilder(['cup'], attributes=attributes)


def test_describe_needs_attributes():
    with pytest.raises(ValueError, match='at least one attribute'):
        PromptBuilder(['cup'], describe=True, attributes=())
    assert PromptBuilder(['cup'], attributes=()).attributes == ()


def test_instruction_is_computed_once():
    builder = PromptBuilder(['cup'])
    assert builder.instruction is builder.instruction
    assert isinstance(builder.instruction, str)


def test_template_overrides_the_instruction():
    builder = PromptBuilder(['cup', 'bowl'], template='Find {categories}; describe {attributes}.'
                            ' Answer like {{"bbox_2d": [...]}}.')
    assert builder.instruction == ('Find cup, bowl; describe color, shape, appearance. '
                                   'Answer like {"bbox_2d": [...]}.')
    plain = PromptBuilder(['cup'], template='Find "{categories}".')
    assert plain.instruction == 'Find "cup".'


@pytest.mark.parametrize('template, reason', [
    ('Find the objects.', 'must contain {categories}'),
    ('Find {categories} in {image}.', r'placeholder {image} is not allowed'),
    ('Find {categories} {}', r'placeholder {} is not allowed'),
    ('Find {categories} {0}', r'placeholder \{0\} is not allowed'),
    ('Find {categories.upper}', 'not allowed'),
    ('Find {categories} {"bbox_2d": 1}', 'not allowed'),
    ('Find {categories', 'not a valid format string'),
    ('Find {categories} }', 'not a valid format string'),
    ('Find {categories} <image>', 'must not contain'),
    (42, 'must be a string'),
])
def test_bad_templates_are_rejected_with_a_reason(template, reason):
    with pytest.raises(ValueError, match=reason):
        PromptBuilder(['cup'], template=template)


def test_build_messages_puts_text_before_image():
    messages = build_messages('find cups')
    assert messages == [{'role': 'user', 'content': [
        {'type': 'text', 'text': 'find cups'}, {'type': 'image'}]}]
    assert PromptBuilder(['cup']).messages()[0]['content'][0]['text'].startswith('locate')


def test_training_user_text_mirrors_message_order():
    instruction = PromptBuilder(['cup']).instruction
    text = training_user_text(instruction)
    assert IMAGE_PLACEHOLDER == '<image>'
    assert text == instruction + '<image>'
    assert text.count(IMAGE_PLACEHOLDER) == 1
    with pytest.raises(ValueError):
        training_user_text('look at <image>')


OBJECTS = [
    ParsedObject('cup', (10, 20, 30, 40), {'color': 'red', 'shape': 'cylinder'}),
    ParsedObject('table', (0, 500, 1000, 1000), {'appearance': 'wooden, "old" top'}),
    ParsedObject('cup', (700, 700, 710, 720), {}),
]


def test_format_answer_is_qwen3_native():
    answer = format_answer(OBJECTS[:1], attributes=('color',))
    assert answer == ('```json\n[\n  {"bbox_2d": [10, 20, 30, 40], "label": "cup", '
                      '"color": "red"}\n]\n```')
    assert format_answer([]) == '```json\n[]\n```'


def test_format_answer_writes_grid_integers_in_order():
    answer = format_answer([ParsedObject('cup', (30.4, 40.6, 10.0, 20.0))])
    assert '"bbox_2d": [10, 20, 30, 41]' in answer
    body = answer[len('```json\n'):-len('\n```')]
    assert json.loads(body) == [{'bbox_2d': [10, 20, 30, 41], 'label': 'cup'}]


def test_format_answer_keeps_only_requested_nonempty_attributes():
    obj = ParsedObject('cup', (1, 2, 3, 4), {'color': 'red', 'shape': ' ', 'size': 'big'})
    answer = format_answer([obj], attributes=('shape', 'color', 'appearance'))
    assert answer.count('"color": "red"') == 1
    assert 'shape' not in answer and 'size' not in answer and 'appearance' not in answer


@pytest.mark.parametrize('box', [(0, 0, 1001, 5), (-1, 0, 5, 5), (0, float('nan'), 5, 5)])
def test_format_answer_rejects_boxes_off_the_grid(box):
    with pytest.raises(ValueError, match='grid'):
        format_answer([ParsedObject('cup', box)])


@pytest.mark.parametrize('attributes', [(), DEFAULT_ATTRIBUTES])
def test_format_answer_round_trips_through_the_parser(attributes):
    answer = format_answer(OBJECTS, attributes=attributes)
    result = parse_objects(answer, LabelMatcher(['cup', 'table']), attributes)
    assert not result.truncated and result.invalid == 0 and result.unknown_labels == []
    assert len(result.objects) == len(OBJECTS)
    for parsed, original in zip(result.objects, OBJECTS):
        assert parsed.label == original.label
        assert parsed.box == original.box
        expected = {key: value for key, value in original.attributes.items()
                    if key in attributes}
        assert parsed.attributes == expected
    assert format_answer(result.objects, attributes) == answer


def test_format_answer_round_trips_unicode_labels_and_attributes():
    objects = [ParsedObject('Tasse', (1, 2, 3, 4), {'color': 'grün \\ blau'})]
    answer = format_answer(objects, ('color',))
    assert 'grün' in answer
    parsed = parse_objects(answer, LabelMatcher(['Tasse']), ('color',)).objects
    assert parsed[0].attributes == {'color': 'grün \\ blau'}
