"""Category validation and the mapping of model labels onto allowed categories."""
import pytest

from qwen_vl_perception.categories import (
    MAX_CATEGORY_LENGTH, LabelMatcher, label_key, normalize_categories)


def test_normalize_strips_collapses_and_deduplicates_keeping_first_spelling():
    assert normalize_categories(['  cup ', 'Coffee \t  Table', 'CUP', 'coffee table', 'box']) \
        == ['cup', 'Coffee Table', 'box']


def test_normalize_accepts_any_iterable_of_names():
    assert normalize_categories(name for name in ('cup', 'bowl')) == ['cup', 'bowl']
    assert normalize_categories(('t-shirt', "potted plant")) == ['t-shirt', 'potted plant']


@pytest.mark.parametrize('values, reason', [
    ([], 'must not be empty'),
    (None, 'list of names'),
    ('cup', 'list of names'),
    (42, 'list of names'),
    (['cup', 3], 'must be a string'),
    (['cup', None], 'must be a string'),
    (['cup', '   '], 'is empty'),
    (['say "cup"'], 'would break the prompt'),
    (["cup's"], 'would break the prompt'),
    (['cup, table'], 'would break the prompt'),
    (['cup\ntable'], 'line break'),
    (['cup\r'], 'line break'),
    (['cup\u2028'], 'line break'),
    (['{cup}'], 'would break the prompt'),
    (['cup]'], 'would break the prompt'),
    (['<image>'], 'would break the prompt'),
    (['x' * (MAX_CATEGORY_LENGTH + 1)], 'limit is'),
])
def test_normalize_rejects_with_a_reason(values, reason):
    with pytest.raises(ValueError, match=reason):
        normalize_categories(values)


def test_normalize_names_the_bad_entry():
    with pytest.raises(ValueError, match='#1'):
        normalize_categories(['cup', 'a,b'])


def test_normalize_accepts_the_longest_allowed_name():
    name = 'x' * MAX_CATEGORY_LENGTH
    assert normalize_categories([name]) == [name]


def test_label_key():
    assert label_key('  The Coffee_Table. ') == 'coffee table'
    assert label_key('"cup"') == 'cup'
    assert label_key('T-Shirt') == 't shirt'
    assert label_key('a') == 'a'


CATEGORIES = ['cup', 'tissue box', 'shelf', 'potted plant', 'bottle', 'table', 'glass',
              'cookie', 'berry', 'knife', 'person', 'T-shirt', 'box', 'bus', 'dish']


@pytest.fixture(scope='module')
def matcher():
    return LabelMatcher(CATEGORIES)


@pytest.mark.parametrize('label, expected', [
    ('cup', 'cup'),
    ('Cup', 'cup'),
    ('CUPS', 'cup'),
    ('cups', 'cup'),
    ('boxes', 'box'),
    ('tissue boxes', 'tissue box'),
    ('Tissue_Boxes', 'tissue box'),
    ('tissue-box', 'tissue box'),
    ('tissue   box', 'tissue box'),
    ('bottles', 'bottle'),
    ('shelves', 'shelf'),
    ('potted plants', 'potted plant'),
    ('potted_plant', 'potted plant'),
    ('a cup', 'cup'),
    ('an bottle', 'bottle'),
    ('the table', 'table'),
    ('The Tables', 'table'),
    ('glasses', 'glass'),
    ('cookies', 'cookie'),
    ('berries', 'berry'),
    ('knives', 'knife'),
    ('people', 'person'),
    ('t shirts', 'T-shirt'),
    ('buses', 'bus'),
    ('bus', 'bus'),
    ('dishes', 'dish'),
    ('"cup"', 'cup'),
    ('cup.', 'cup'),
])
def test_match_word_forms(matcher, label, expected):
    assert matcher.match(label) == expected


@pytest.mark.parametrize('label', [
    'dog', '', '   ', 'the', 'cupboard', 'cu', 'tissue', 'plants', 'shelve', 'knive',
    'cup holder', 'bottle cap',
])
def test_match_unknown_is_none(matcher, label):
    assert matcher.match(label) is None


def test_match_non_string_is_none(matcher):
    assert matcher.match(None) is None
    assert matcher.match(['cup']) is None
    assert matcher.match(3) is None


def test_match_head_noun(matcher):
    assert matcher.match('red cup') == 'cup'
    assert matcher.match('paper cups') == 'cup'
    assert matcher.match('wooden coffee table') == 'table'
    # The longest category that ends the label wins.
    assert matcher.match('blue tissue box') == 'tissue box'


def test_head_noun_matching_can_be_turned_off():
    strict = LabelMatcher(['cup'], match_head_noun=False)
    assert strict.match('red cup') is None
    assert strict.match('cups') == 'cup'


def test_exact_category_beats_plural_stripping():
    both = LabelMatcher(['glass', 'glasses'])
    assert both.match('glasses') == 'glasses'
    assert both.match('glass') == 'glass'
    cups = LabelMatcher(['cups', 'cup'])
    assert cups.match('cup') == 'cup'
    assert cups.match('cups') == 'cups'


def test_plural_category_matches_a_singular_label():
    assert LabelMatcher(['scissors']).match('scissor') == 'scissors'
    assert LabelMatcher(['boxes']).match('box') == 'boxes'


def test_matcher_returns_the_category_spelling_given(matcher):
    assert LabelMatcher(['Coffee Mug']).match('coffee mugs') == 'Coffee Mug'


def test_matcher_validates_its_categories():
    with pytest.raises(ValueError):
        LabelMatcher([])
    assert LabelMatcher([' cup ', 'CUP']).categories == ['cup']


def test_match_is_repeatable_past_the_cache_limit():
    matcher = LabelMatcher(['cup'])
    for index in range(5000):
        assert matcher.match(f'thing {index}') is None
    assert matcher.match('cups') == 'cup'
    assert matcher.match('cups') == 'cup'
