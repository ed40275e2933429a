"""backends/answers.py: a chat completion's text, token offsets and scores rebuilt from its
token bytes and log-probabilities as the local engine builds them; answers without usable
log-probabilities score 1.0 and say why."""
import math

import pytest

from qwen_vl_perception.backends.answers import (MISMATCHED_LOGPROBS, NO_LOGPROBS,
                                                 parse_answer, text_and_offsets)

from http_servers import ANSWER


def logprob_entries(pieces, logprob=-0.1):
    return [{'token': piece, 'logprob': logprob, 'bytes': list(piece.encode()),
             'top_logprobs': []} for piece in pieces]


def completion(content, entries=None, finish_reason='stop'):
    choice = {'index': 0, 'finish_reason': finish_reason,
              'message': {'role': 'assistant', 'content': content}}
    if entries is not None:
        choice['logprobs'] = {'content': entries}
    return {'choices': [choice], 'usage': {'prompt_tokens': 42}}


def _gpt2_byte_decoder():
    """The byte-level BPE alphabet (printable bytes as themselves, the rest from U+0100)."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
                 + list(range(ord('®'), ord('ÿ') + 1)))
    extra = 0
    decoder = {}
    for byte in range(256):
        if byte in printable:
            decoder[chr(byte)] = byte
        else:
            decoder[chr(256 + extra)] = byte
            extra += 1
    return decoder


def test_offsets_from_token_bytes_are_the_local_engines(tiny_checkpoint):
    transformers = pytest.importorskip('transformers')
    from qwen_vl_perception.model.generation import decode_with_offsets
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    byte_of = _gpt2_byte_decoder()
    split_characters = 0
    for text in (ANSWER, 'größe 日本語のテキスト 🎉🦜 café — naïve', '"label": "🧯 extinguisher"'):
        ids = tokenizer(text)['input_ids']
        token_bytes = [bytes(byte_of[char] for char in token)
                       for token in tokenizer.convert_ids_to_tokens(ids)]
        assert text_and_offsets(token_bytes) == decode_with_offsets(tokenizer, ids)
        split_characters += sum(1 for start, end in text_and_offsets(token_bytes)[1]
                                if start == end)
    assert split_characters > 0  # tokens holding part of a character were covered


def test_an_answer_becomes_the_local_engines_generation():
    pieces = ['```', 'json', '\n[{"', 'bbox', '_', '2', 'd', '":', ' [', '1', '0', '0', ',',
              ' ', '2', '0', '0', ', ', '3', '0', '0', ', ', '4', '0', '0', '],', ' "', 'label',
              '":', ' "', 'cup', '"}', ']\n', '```']
    assert ''.join(pieces) == ANSWER
    entries = logprob_entries(pieces) + logprob_entries(['<|im_end|>'], -1e-6)
    answer = parse_answer(completion(ANSWER, entries), (64, 48))
    generation = answer.generation
    assert answer.logprob_problem is None and answer.prompt_tokens == 42
    assert generation.text == ANSWER and generation.finished
    assert generation.model_input_size == (64, 48)
    assert len(generation.token_probs) == len(pieces)  # the stop token is not the answer's
    assert generation.token_probs[0] == pytest.approx(math.exp(-0.1))
    assert generation.token_offsets[-1] == (len(ANSWER) - 3, len(ANSWER))
    cut = parse_answer(completion(ANSWER, logprob_entries(pieces), 'length')).generation
    assert not cut.finished and len(cut.token_probs) == len(pieces)


def test_an_answer_without_usable_logprobs_scores_one_and_says_why():
    for entries, problem in ((None, NO_LOGPROBS), ([], NO_LOGPROBS),
                             (logprob_entries(['```', 'yaml']), MISMATCHED_LOGPROBS),
                             ([{'token': 'x'}], MISMATCHED_LOGPROBS)):
        answer = parse_answer(completion(ANSWER, entries))
        assert answer.logprob_problem == problem
        assert answer.generation.token_probs == [] and answer.generation.text == ANSWER
    for broken in ({}, {'choices': []}, {'choices': [{'message': {}}]},
                   {'choices': [{'message': {'content': 3}}]}):
        with pytest.raises(ValueError, match='content'):
            parse_answer(broken)
