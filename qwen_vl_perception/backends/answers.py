"""A chat-completions answer as a :class:`~qwen_vl_perception.model.generation.Generation`.

With ``logprobs: true`` an OpenAI-compatible server returns, per generated token, its
log-probability and its bytes (``choices[0].logprobs.content[i].logprob`` / ``.bytes``). The
text and the per-character token offsets are rebuilt from those bytes exactly as the local
engine's :func:`~qwen_vl_perception.model.generation.decode_with_offsets` gives them: a token
ends where the complete UTF-8 characters of the bytes so far end, so a token holding only part
of a character has an empty span and the one completing it owns the character. The scores
(:mod:`qwen_vl_perception.scoring`) then come out as the local engine's do.

A stop token the server lists after the answer (vLLM lists ``<|im_end|>``) is not part of the
message text: trailing tokens that make up exactly what follows the text are dropped, as the
local engine drops its stop token. Without usable log-probabilities (none returned, or tokens
that do not spell the answer) the generation has no probabilities, so every object scores 1.0
(:func:`~qwen_vl_perception.detector.detections_from_text`), and the reason is returned for a
diagnostic.
"""
import codecs
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..model.generation import Generation

NO_LOGPROBS = 'the server returned no token log-probabilities'
MISMATCHED_LOGPROBS = "the server's token log-probabilities do not spell its answer"
MAX_STOP_TOKENS = 4
"""Most tokens after the answer's text taken for stop tokens."""


@dataclass
class Answer:
    """One parsed answer: the generation, why it has no probabilities (None when it has),
    and the prompt's token count the server reports (``usage.prompt_tokens``), if any."""

    generation: Generation
    logprob_problem: Optional[str]
    prompt_tokens: Optional[int]


def text_and_offsets(token_bytes: Sequence[bytes]) -> Tuple[str, List[Tuple[int, int]]]:
    """The UTF-8 text of the tokens' bytes (invalid bytes as U+FFFD) and each token's
    ``(start, end)`` character span; spans are contiguous and end at ``len(text)``."""
    decoder = codecs.getincrementaldecoder('utf-8')('replace')
    pieces, offsets = [], []
    end = 0
    for index, data in enumerate(token_bytes):
        piece = decoder.decode(bytes(data), final=index == len(token_bytes) - 1)
        pieces.append(piece)
        offsets.append((end, end + len(piece)))
        end += len(piece)
    return ''.join(pieces), offsets


def parse_answer(answer, model_input_size: Optional[Tuple[int, int]] = None) -> Answer:
    """The first choice of a chat-completions answer (already JSON-decoded).

    ValueError when it has no ``choices[0].message.content`` string (the caller reports a
    bad answer); missing or unusable log-probabilities are no error (see the module).
    """
    try:
        choice = answer['choices'][0]
        text = choice['message']['content']
    except (KeyError, IndexError, TypeError):
        raise ValueError('it has no choices[0].message.content') from None
    if text is None:
        text = ''
    if not isinstance(text, str):
        raise ValueError(f'its choices[0].message.content is a {type(text).__name__}')
    finished = choice.get('finish_reason') == 'stop'
    usage = answer.get('usage') if isinstance(answer.get('usage'), dict) else {}
    prompt_tokens = usage.get('prompt_tokens')
    prompt_tokens = prompt_tokens if isinstance(prompt_tokens, int) else None
    probs, offsets, problem = _token_probabilities(choice.get('logprobs'), text)
    generation = Generation(text=text, token_ids=[], token_probs=probs, token_offsets=offsets,
                            finished=finished, model_input_size=model_input_size)
    return Answer(generation=generation, logprob_problem=problem, prompt_tokens=prompt_tokens)


def _token_probabilities(logprobs, text: str):
    """(probabilities, offsets, problem) of the answer's tokens."""
    entries = logprobs.get('content') if isinstance(logprobs, dict) else None
    if not isinstance(entries, list) or (not entries and text):
        return [], [], NO_LOGPROBS
    token_bytes, probs = [], []
    for entry in entries:
        if not isinstance(entry, dict):
            return [], [], MISMATCHED_LOGPROBS
        data = entry.get('bytes')
        if data is None and isinstance(entry.get('token'), str):
            data = entry['token'].encode('utf-8')
        try:
            data = bytes(data)
            logprob = float(entry['logprob'])
        except (KeyError, TypeError, ValueError):
            return [], [], MISMATCHED_LOGPROBS
        token_bytes.append(data)
        # exp(-inf) = 0; a NaN is no probability; rounding above 0 is certainty
        probs.append(0.0 if math.isnan(logprob) else math.exp(min(logprob, 0.0)))
    for count in range(len(token_bytes), max(len(token_bytes) - MAX_STOP_TOKENS, 0) - 1, -1):
        spelled, offsets = text_and_offsets(token_bytes[:count])
        if spelled == text:
            return probs[:count], offsets, None
        if not spelled.startswith(text):
            break
    return [], [], MISMATCHED_LOGPROBS
