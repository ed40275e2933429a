"""The parser of model answers: formats it must read, and text it must survive."""
import json
import random
import subprocess
import sys
import time

import pytest

from qwen_vl_perception.categories import LabelMatcher
from qwen_vl_perception.parsing import ParseResult, parse_objects

MATCHER = LabelMatcher(['cup', 'table', 'tissue box', 'bottle'])

THREE = ('```json\n'
         '[\n'
         '  {"bbox_2d": [12, 50, 230, 410], "label": "cup", "color": "red"},\n'
         '  {"bbox_2d": [300, 400, 999, 1000], "label": "tables", "shape": "round {big}"},\n'
         '  {"bbox_2d": [5, 6, 7, 8], "label": "Tissue_Box", "appearance": "it\'s \\"new\\""}\n'
         ']\n'
         '```')
THREE_EXPECTED = [
    ('cup', (12, 50, 230, 410), {'color': 'red'}),
    ('table', (300, 400, 999, 1000), {'shape': 'round {big}'}),
    ('tissue box', (5, 6, 7, 8), {'appearance': 'it\'s "new"'}),
]


def summary(result):
    return [(obj.label, obj.box, obj.attributes) for obj in result.objects]


def test_native_answer():
    result = parse_objects(THREE, MATCHER)
    assert isinstance(result, ParseResult)
    assert summary(result) == THREE_EXPECTED
    assert result.unknown_labels == [] and result.invalid == 0 and not result.truncated


def test_spans_index_each_object_text():
    result = parse_objects(THREE, MATCHER)
    for obj in result.objects:
        start, end = obj.span
        chunk = THREE[start:end]
        assert chunk.startswith('{"bbox_2d"') and chunk.endswith('}')
        assert tuple(json.loads(chunk)['bbox_2d']) == obj.box
    lines = THREE.split('\n')[2:5]
    assert [THREE[o.span[0]:o.span[1]] for o in result.objects] == [
        line.strip().rstrip(',') for line in lines]


def test_spans_with_prose_and_no_fence():
    text = 'Sure! Here they are: {"bbox_2d": [1, 2, 3, 4], "label": "cup"} and that is all.'
    result = parse_objects(text, MATCHER)
    assert summary(result) == [('cup', (1, 2, 3, 4), {})]
    start, end = result.objects[0].span
    assert text[start:end] == '{"bbox_2d": [1, 2, 3, 4], "label": "cup"}'
    assert not result.truncated


def test_every_truncation_keeps_exactly_the_complete_objects():
    full = parse_objects(THREE, MATCHER).objects
    ends = [obj.span[1] for obj in full]
    for cut in range(len(THREE) + 1):
        result = parse_objects(THREE[:cut], MATCHER)
        complete = sum(end <= cut for end in ends)
        assert summary(result) == THREE_EXPECTED[:complete], cut
        assert [obj.span for obj in result.objects] == [obj.span for obj in full[:complete]]
        assert result.invalid == 0, cut
        assert result.unknown_labels == []
        assert result.truncated == (3 <= cut < len(THREE)), cut


def test_truncated_inside_an_object_without_fence():
    text = '[{"bbox_2d": [1, 2, 3, 4], "label": "cup"}, {"bbox_2d": [5, 6, 7'
    result = parse_objects(text, MATCHER)
    assert summary(result) == [('cup', (1, 2, 3, 4), {})]
    assert result.truncated


def test_unclosed_list_is_truncated_but_closed_one_is_not():
    obj = '{"bbox_2d": [1, 2, 3, 4], "label": "cup"}'
    assert parse_objects('[' + obj + ',', MATCHER).truncated
    assert not parse_objects('[' + obj + ']', MATCHER).truncated
    assert not parse_objects(obj, MATCHER).truncated


def test_single_object_not_in_a_list():
    result = parse_objects('```json\n{"bbox_2d": [1, 2, 3, 4], "label": "bottle"}\n```', MATCHER)
    assert summary(result) == [('bottle', (1, 2, 3, 4), {})]


@pytest.mark.parametrize('box_key', ['bbox_2d', 'bbox', 'box', 'BBox_2D'])
@pytest.mark.parametrize('label_key', ['label', 'category', 'name', 'Label'])
def test_key_aliases(box_key, label_key):
    text = f'[{{"{box_key}": [1, 2, 3, 4], "{label_key}": "cup"}}]'
    assert summary(parse_objects(text, MATCHER)) == [('cup', (1, 2, 3, 4), {})]


@pytest.mark.parametrize('box_text, expected', [
    ('["1", "2", "3", "4"]', (1, 2, 3, 4)),
    ('[1.5, 2.25, 3, 4e2]', (1.5, 2.25, 3, 400)),
    ('[" 7 ", 8, "9.5", 10]', (7, 8, 9.5, 10)),
    ('[[1, 2], [3, 4]]', (1, 2, 3, 4)),
    ('"1, 2, 3, 4"', (1, 2, 3, 4)),
    ('{"x1": 1, "y1": 2, "x2": 3, "y2": 4}', (1, 2, 3, 4)),
    ('[30, 40, 10, 20]', (10, 20, 30, 40)),
    ('[0, 1200, -5, 2000]', (-5, 1200, 0, 2000)),
])
def test_box_forms(box_text, expected):
    result = parse_objects(f'{{"bbox_2d": {box_text}, "label": "cup"}}', MATCHER)
    assert summary(result) == [('cup', expected, {})]


def test_separate_corner_keys():
    text = '{"x1": 1, "y1": 2, "x2": 3, "y2": 4, "label": "cup"}'
    assert summary(parse_objects(text, MATCHER)) == [('cup', (1, 2, 3, 4), {})]


@pytest.mark.parametrize('box_text', [
    '[1, 2, 3]', '[1, 2, 3, 4, 5]', '["a", 2, 3, 4]', '[1, 2, 3, null]', '[true, 2, 3, 4]',
    '[NaN, 2, 3, 4]', '[1e999, 2, 3, 4]', '"none"', '[]', '5', '[[1, 2], [3]]',
    '[1, 2, 3, ' + '9' * 5000 + ']',
])
def test_malformed_boxes_are_invalid(box_text):
    result = parse_objects(f'[{{"bbox_2d": {box_text}, "label": "cup"}}]', MATCHER)
    assert result.objects == [] and result.invalid == 1 and result.unknown_labels == []


def test_missing_box_or_label_is_invalid_and_others_survive():
    text = ('[{"label": "cup"}, {"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 3, 4], '
            '"label": ""}, {"bbox_2d": [1, 2, 3, 4], "label": null}, '
            '{"bbox_2d": [9, 9, 10, 10], "label": "cup"}]')
    result = parse_objects(text, MATCHER)
    assert summary(result) == [('cup', (9, 9, 10, 10), {})]
    assert result.invalid == 4


def test_unknown_labels_are_reported_with_their_text():
    text = ('[{"bbox_2d": [1, 2, 3, 4], "label": "Dog"}, '
            '{"bbox_2d": [1, 2, 3, 4], "label": " cat "}, '
            '{"bbox_2d": [1, 2, 3, 4], "label": "cups"}]')
    result = parse_objects(text, MATCHER)
    assert result.unknown_labels == ['Dog', 'cat']
    assert summary(result) == [('cup', (1, 2, 3, 4), {})]
    assert result.invalid == 0


def test_attributes_any_case_any_type():
    text = ('{"bbox_2d": [1, 2, 3, 4], "label": "cup", "Color": ["red", "white"], '
            '"SHAPE": 3, "appearance": null, "size": "big"}')
    result = parse_objects(text, MATCHER)
    assert result.objects[0].attributes == {'color': 'red, white', 'shape': '3'}
    custom = parse_objects(text, MATCHER, attribute_keys=('Size', 'color'))
    assert custom.objects[0].attributes == {'Size': 'big', 'color': 'red, white'}
    assert parse_objects(text, MATCHER, attribute_keys=()).objects[0].attributes == {}


def test_attributes_nested_in_an_attributes_object():
    text = ('{"bbox_2d": [1, 2, 3, 4], "label": "cup", '
            '"attributes": {"color": "blue", "Shape": "tall"}}')
    attributes = parse_objects(text, MATCHER).objects[0].attributes
    assert attributes == {'color': 'blue', 'shape': 'tall'}


def test_near_json_single_quotes_trailing_commas_python_literals():
    text = ("[{'bbox_2d': [1, 2, 3, 4], 'label': 'cup', 'appearance': 'it\\'s \"ok\"',},\n"
            " {'bbox_2d': [5, 6, 7, 8,], 'label': 'bottle', 'shape': None, 'color': True}]")
    result = parse_objects(text, MATCHER)
    assert summary(result) == [('cup', (1, 2, 3, 4), {'appearance': 'it\'s "ok"'}),
                               ('bottle', (5, 6, 7, 8), {'color': 'true'})]
    assert result.invalid == 0


def test_a_broken_string_loses_one_object_not_the_rest():
    text = ('[\n  {"bbox_2d": [1, 2, 3, 4], "label": "cup, "color": "red},\n'
            '  {"bbox_2d": [5, 6, 7, 8], "label": "bottle"}\n]')
    result = parse_objects(text, MATCHER)
    assert summary(result) == [('bottle', (5, 6, 7, 8), {})]
    assert result.invalid == 1


def test_wrapped_list_of_objects():
    text = '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "cup"}, ' \
           '{"bbox_2d": [5, 6, 7, 8], "label": "table"}]}'
    result = parse_objects(text, MATCHER)
    assert summary(result) == [('cup', (1, 2, 3, 4), {}), ('table', (5, 6, 7, 8), {})]
    assert text[slice(*result.objects[1].span)] == '{"bbox_2d": [5, 6, 7, 8], "label": "table"}'
    assert result.invalid == 0
    cut = parse_objects(text[:-10], MATCHER)
    assert summary(cut) == [('cup', (1, 2, 3, 4), {})] and cut.truncated


def test_pretty_printed_multiline_json():
    text = json.dumps([{'bbox_2d': [1, 2, 3, 4], 'label': 'cup'},
                       {'bbox_2d': [5, 6, 7, 8], 'label': 'bottle'}], indent=4)
    assert len(parse_objects(text, MATCHER).objects) == 2


def test_no_objects():
    for text in ['', 'There is no cup in the image.', '```json\n[]\n```', '[]', '}}]]']:
        result = parse_objects(text, MATCHER)
        assert result.objects == [] and result.invalid == 0 and not result.truncated


@pytest.mark.parametrize('value', [None, 42, b'{"bbox_2d": [1,2,3,4], "label": "cup"}', ['x']])
def test_non_string_input(value):
    result = parse_objects(value, MATCHER)
    assert result.objects == [] and not result.truncated


@pytest.mark.parametrize('text', [
    '{' * 20000,
    '[' * 20000,
    '{"a": ' * 5000 + '1' + '}' * 5000,
    '{' * 5000 + '}' * 5000,
    '"' * 999 + '{' + "'" * 999,
    '{"bbox_2d": [1, 2, 3, 4], "label": "cup"\\',
    '\x00\ud800{"bbox_2d":[1,2,3,4],"label":"cup"}\uffff',
])
def test_pathological_text_does_not_raise(text):
    parse_objects(text, MATCHER)


def test_random_garbage_and_mutations_never_raise():
    rng = random.Random(1234)
    alphabet = '{}[]"\',:\\ \n\t0123456789.-eE_abcdlptux`' + 'bbox_2d label cup '
    for _ in range(1500):
        length = rng.randrange(0, 120)
        text = ''.join(rng.choice(alphabet) for _ in range(length))
        result = parse_objects(text, MATCHER)
        assert isinstance(result, ParseResult)
    for _ in range(1500):
        chars = list(THREE)
        for _ in range(rng.randrange(1, 6)):
            position = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.4:
                del chars[position]
            elif action < 0.7:
                chars.insert(position, rng.choice(alphabet))
            else:
                chars[position] = rng.choice(alphabet)
        text = ''.join(chars)
        result = parse_objects(text, MATCHER)
        assert len(result.objects) <= 3
        for obj in result.objects:
            assert obj.box[0] <= obj.box[2] and obj.box[1] <= obj.box[3]
            assert 0 <= obj.span[0] < obj.span[1] <= len(text)
            assert text[obj.span[0]] == '{' and text[obj.span[1] - 1] == '}'


def test_parsing_a_long_answer_is_fast():
    """No backtracking blow-up: a 60-object answer parses in well under 50 ms of this process's
    CPU time (~2 ms here; CPU time, which other jobs on a shared machine do not add to)."""
    line = '  {"bbox_2d": [123, 456, 789, 999], "label": "bottle", "color": "dark green"}'
    text = '```json\n[\n' + ',\n'.join([line] * 60) + '\n]\n```'
    parse_objects(text, MATCHER)
    began = time.process_time()
    for _ in range(20):
        result = parse_objects(text, MATCHER)
    assert len(result.objects) == 60
    assert (time.process_time() - began) / 20 < 0.05


def test_text_core_imports_without_heavy_dependencies():
    code = ('import sys\n'
            'import qwen_vl_perception.categories, qwen_vl_perception.prompt\n'
            'import qwen_vl_perception.parsing, qwen_vl_perception.geometry\n'
            'import qwen_vl_perception.scoring\n'
            'heavy = {"torch", "rclpy", "cv2", "transformers"} & set(sys.modules)\n'
            'assert not heavy, heavy\n')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=60)


def test_a_lone_surrogate_becomes_a_replacement_character_that_can_be_published():
    text = ('[{"bbox_2d": [1, 2, 3, 4], "label": "cup\\udc00", "color": "\\ud83d"}, '
            '{"bbox_2d": [1, 2, 3, 4], "label": "cup", "color": ["\\ud83d\\ude00", "red"]}]')
    result = parse_objects(text, MATCHER)
    assert result.unknown_labels == ['cup\ufffd']
    assert [obj.attributes for obj in result.objects] == [{'color': '\U0001f600, red'}]
    text = ('{"bbox_2d": [1, 2, 3, 4], "label": "cup", "color": "\\ud83d", '
            '"shape": {"a": "\\udfff"}}')
    (obj,) = parse_objects(text, MATCHER).objects
    assert obj.attributes['color'] == '\ufffd'
    assert all(value.encode('utf-8') for value in obj.attributes.values())
    # What failed before: publishing the descriptions (rclpy encodes strings as UTF-8).
    pytest.importorskip('rclpy')
    from rclpy.serialization import serialize_message
    from std_msgs.msg import Header
    from qwen_vl_perception.detection import Detection
    from qwen_vl_perception.ros.messages import descriptions_msg
    detection = Detection(label=obj.label, box=(1, 2, 3, 4), score=1.0, id='0',
                          attributes=obj.attributes)
    assert serialize_message(descriptions_msg(Header(), [detection]))


def test_an_attribute_nested_too_deep_invalidates_its_object_and_parsing_goes_on():
    deep = '[' * 900 + '"red"' + ']' * 900
    deep_dict = '{"a": ' * 900 + '1' + '}' * 900
    text = (f'[{{"bbox_2d": [1, 2, 3, 4], "label": "cup", "color": {deep}}}, '
            f'{{"bbox_2d": [1, 2, 3, 4], "label": "cup", "color": {deep_dict}}}, '
            '{"bbox_2d": [5, 6, 7, 8], "label": "bottle", "color": [[["red"]], "blue"]}]')
    result = parse_objects(text, MATCHER)
    assert summary(result) == [('bottle', (5, 6, 7, 8), {'color': 'red, blue'})]
    assert result.invalid == 2


def test_objects_beyond_the_cap_are_counted_not_kept():
    from qwen_vl_perception.detector import (DetectionSettings, detections_from_text,
                                             prepare_settings)
    from qwen_vl_perception.parsing import MAX_OBJECTS
    count = 10_000  # distinct boxes: de-duplicating all of them took minutes (quadratic)
    text = '[' + ','.join(f'{{"bbox_2d": [{i % 100 * 10}, {i // 100 * 10}, '
                          f'{i % 100 * 10 + 5}, {i // 100 * 10 + 5}], "label": "cup"}}'
                          for i in range(count)) + ']'
    result = parse_objects(text, MATCHER)
    assert (len(result.objects), result.excess, result.invalid) == \
        (MAX_OBJECTS, count - MAX_OBJECTS, 0)
    prepared = prepare_settings(DetectionSettings(categories=('cup',)))
    frame = detections_from_text(text, prepared, (10_000, 10_000))
    assert (len(frame.detections), frame.excess) == (MAX_OBJECTS, count - MAX_OBJECTS)
