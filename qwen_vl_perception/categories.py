"""Category names: validating the ones a user asks for, and mapping model labels onto them."""
import unicodedata
from typing import Dict, Iterable, List, Optional, Tuple

ARTICLE_CATEGORIES = ('table', 'cup', 'bottle', 'chair', 'robot', 'garbage can', 'shelf',
                      'tissue box', 'potted plant')
"""The office categories of the blog post the project grew from ("Qwen3-VL + LoRA SFT + 4-bit
quantization", see README.md): its inference script's list, the node's default."""

MAX_CATEGORY_LENGTH = 64
"""Longest accepted category name, in characters (after whitespace is collapsed)."""

FORBIDDEN_CHARACTERS = '"\'`,;{}[]<>\\'
"""Characters that would break the prompt's quoted, comma-separated list or the JSON answer."""

_ARTICLES = ('a', 'an', 'the')
_EDGE_PUNCTUATION = ' \t"\'`.,;:!?*()'
_MATCH_CACHE_LIMIT = 4096

# Plurals that dropping an "s"/"es"/"ies"/"ves" ending does not undo.
_IRREGULAR_PLURALS = {
    'people': 'person',
    'men': 'man',
    'women': 'woman',
    'children': 'child',
    'mice': 'mouse',
    'feet': 'foot',
    'teeth': 'tooth',
    'geese': 'goose',
    'oxen': 'ox',
    'dice': 'die',
    'cacti': 'cactus',
    'fungi': 'fungus',
}


def normalize_categories(values) -> List[str]:
    """Validate and tidy a list of category names.

    Strips and collapses whitespace and drops case-insensitive duplicates (the first spelling
    wins). Raises ``ValueError`` saying which name is wrong and why: an empty list, a value that
    is not a string, an empty name, a name with a character that would break the prompt
    (see ``FORBIDDEN_CHARACTERS``, line breaks and other control characters), or a name longer
    than ``MAX_CATEGORY_LENGTH``.
    """
    if isinstance(values, (str, bytes)) or values is None:
        raise ValueError(
            f'categories must be a list of names, got {type(values).__name__} {values!r}')
    try:
        items = list(values)
    except TypeError:
        raise ValueError(
            f'categories must be a list of names, got {type(values).__name__}') from None
    if not items:
        raise ValueError('categories must not be empty: give at least one category name')

    result: List[str] = []
    seen = set()
    for index, value in enumerate(items):
        name = _validate_name(index, value)
        key = name.casefold()
        if key not in seen:
            seen.add(key)
            result.append(name)
    return result


def _validate_name(index: int, value) -> str:
    where = f'category #{index}'
    if not isinstance(value, str):
        raise ValueError(f'{where} must be a string, got {type(value).__name__} {value!r}')
    for character in value:
        if character in ' \t':
            continue
        if unicodedata.category(character) in ('Cc', 'Cf', 'Zl', 'Zp'):
            raise ValueError(
                f'{where} {value!r} contains a line break or control character '
                f'{character!r}; category names must be one line of text')
        if character in FORBIDDEN_CHARACTERS:
            raise ValueError(
                f'{where} {value!r} contains {character!r}, which would break the prompt '
                f'(names must not contain any of {FORBIDDEN_CHARACTERS})')
    name = ' '.join(value.split())
    if not name:
        raise ValueError(f'{where} is empty')
    if len(name) > MAX_CATEGORY_LENGTH:
        raise ValueError(
            f'{where} {name[:20]!r}... is {len(name)} characters long; '
            f'the limit is {MAX_CATEGORY_LENGTH}')
    return name


def label_key(text: str) -> str:
    """Canonical form of a label for comparison.

    Case-folded; ``_`` and ``-`` read as spaces; whitespace collapsed; quotes and punctuation
    around the label and a leading article ("a", "an", "the") dropped.
    """
    text = text.casefold().replace('_', ' ').replace('-', ' ')
    words = text.strip(_EDGE_PUNCTUATION).split()
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return ' '.join(words)


def singular_candidates(word: str) -> Tuple[str, ...]:
    """Possible singular forms of an English word, most likely first (the word itself excluded).

    Over-generates on purpose ("berries" -> "berrie", "berri", "berry"): the matcher keeps only
    the candidate that is an allowed category, so a wrong guess costs nothing.
    """
    candidates = []
    if word in _IRREGULAR_PLURALS:
        candidates.append(_IRREGULAR_PLURALS[word])
    if len(word) > 2 and word.endswith('s') and not word.endswith('ss'):
        candidates.append(word[:-1])  # cups, bottles, cookies
        if word.endswith('es'):
            candidates.append(word[:-2])  # boxes, glasses, dishes
        if word.endswith('ies') and len(word) > 4:
            candidates.append(word[:-3] + 'y')  # berries
        if word.endswith('ves') and len(word) > 4:
            candidates.append(word[:-3] + 'f')  # shelves, leaves
            candidates.append(word[:-3] + 'fe')  # knives
    return tuple(candidates)


def _singular_keys(key: str) -> Tuple[str, ...]:
    """Candidate singular forms of a multi-word key: only the last (head) word is inflected."""
    head, _, last = key.rpartition(' ')
    prefix = head + ' ' if head else ''
    return tuple(prefix + candidate for candidate in singular_candidates(last))


class LabelMatcher:
    """Maps the label text a model wrote onto one of the allowed categories.

    In order of preference: the same name up to case, ``_``/``-``/spacing and a leading
    article ("the Cup", "coffee_table"); an English plural of it ("cups", "boxes",
    "shelves", "potted plants"); a singular when the category itself is plural; and, when
    ``match_head_noun`` is set, a label that ends with a category name ("red cup" -> "cup",
    the longest such category wins). Anything else is unknown (``None``).

    The lookup tables are built once; ``match`` is a couple of dict lookups plus a small cache.
    """

    def __init__(self, categories: Iterable[str], match_head_noun: bool = True):
        self.categories: List[str] = normalize_categories(categories)
        self.match_head_noun = match_head_noun
        self._exact: Dict[str, str] = {}
        self._singular: Dict[str, str] = {}
        for category in self.categories:
            self._exact.setdefault(label_key(category), category)
        for category in self.categories:
            for candidate in _singular_keys(label_key(category)):
                self._singular.setdefault(candidate, category)
        self._cache: Dict[str, Optional[str]] = {}

    def match(self, label: str) -> Optional[str]:
        """Return the allowed category that ``label`` names, or ``None``."""
        try:
            return self._cache[label]
        except (KeyError, TypeError):
            pass
        if not isinstance(label, str):
            return None
        result = self._lookup(label_key(label))
        if len(self._cache) >= _MATCH_CACHE_LIMIT:
            self._cache.clear()
        self._cache[label] = result
        return result

    def _lookup(self, key: str) -> Optional[str]:
        if not key:
            return None
        found = self._lookup_word_forms(key)
        if found is not None or not self.match_head_noun:
            return found
        # A label that ends with a category ("red cup", "paper cups") names that category;
        # dropping the fewest leading words first makes the longest such category win.
        words = key.split(' ')
        for start in range(1, len(words)):
            found = self._lookup_word_forms(' '.join(words[start:]))
            if found is not None:
                return found
        return None

    def _lookup_word_forms(self, key: str) -> Optional[str]:
        found = self._exact.get(key)
        if found is not None:
            return found
        for candidate in _singular_keys(key):
            found = self._exact.get(candidate)
            if found is not None:
                return found
        return self._singular.get(key)
