"""Greedy decoding with per-token probabilities, and the decoded text with token offsets.

A decoder is any callable with the :class:`Decoder` signature; :func:`hf_decode` (transformers'
``model.generate``) is the default, and a faster one (CUDA graphs) can be swapped in. A decoder
calls an optional ``on_step`` hook after every generated token (:class:`DecodeStep`): progress
for whoever waits, and a way to stop (cancel) between two tokens.
"""
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

from .torch_support import require, require_torch

TokenIds = List[List[int]]
TokenProbs = List[List[float]]


@dataclass
class Generation:
    """One decoded answer.

    ``token_ids``/``token_probs``: the generated tokens without the stop token, and the
    model's softmax probability of each (greedy: the highest one). ``token_offsets``:
    (start, end) character span of each token in ``text``; a token holding only part of a
    multi-byte character has an empty span and the one completing it owns the character.
    ``finished``: decoding stopped on a stop token rather than at ``max_new_tokens``.
    ``model_input_size``: (width, height) of the resized image the model saw.
    ``stop_token_id``: the stop token that ended decoding, if any.
    """

    text: str
    token_ids: List[int]
    token_probs: List[float]
    token_offsets: List[Tuple[int, int]]
    finished: bool
    model_input_size: Optional[Tuple[int, int]] = None
    stop_token_id: Optional[int] = field(default=None, repr=False)


@dataclass(frozen=True)
class DecodeStep:
    """What an ``on_step`` hook is told after each generated token.

    ``count``: tokens generated so far by each sequence of the batch (stopped sequences
    included). ``token_ids()``: those tokens, per sequence, cut after a stop token (on CUDA a
    device synchronisation: call it only when needed). ``texts()``: their text, where the
    caller knows the tokenizer (the engine adds it), else None.
    """

    count: int
    token_ids: Callable[[], TokenIds]
    texts: Optional[Callable[[], List[str]]] = None


StepHook = Callable[[DecodeStep], bool]
"""Called after every generated token; returning False stops decoding before the next one
(the tokens so far are returned as an unfinished answer)."""


class Decoder(Protocol):
    """Greedy decoding of a batch.

    Returns, per sequence, the generated token ids (ending with the stop token when one was
    produced, nothing after it) and the probability of each of those tokens.
    ``inputs`` is a :class:`~qwen_vl_perception.model.processor.ModelInputs` on the model's
    device. ``on_step`` (optional keyword): a :data:`StepHook`.
    """

    def __call__(self, model, inputs, max_new_tokens: int, stop_token_ids: Sequence[int],
                 on_step: Optional[StepHook] = None) -> Tuple[TokenIds, TokenProbs]:
        ...


def hf_decode(model, inputs, max_new_tokens: int, stop_token_ids: Sequence[int],
              on_step: Optional[StepHook] = None) -> Tuple[TokenIds, TokenProbs]:
    """The default :class:`Decoder`: ``model.generate`` greedy, probabilities from the raw
    logits (no sampling settings of the checkpoint's generation_config apply). ``on_step``
    runs as a stopping criterion, once per generated token."""
    torch = require_torch()
    transformers = require('transformers', 'to generate with Qwen3-VL')
    if max_new_tokens < 1:
        raise ValueError('max_new_tokens must be at least 1')
    stop_token_ids = [int(token) for token in stop_token_ids]
    tensors = getattr(inputs, 'tensors', inputs)
    pad_token_id = model.generation_config.pad_token_id
    if pad_token_id is None:
        pad_token_id = stop_token_ids[0] if stop_token_ids else 0
    config = transformers.GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=int(max_new_tokens),
        eos_token_id=stop_token_ids or None, pad_token_id=pad_token_id,
        output_logits=True, return_dict_in_generate=True,
        # Neutral values: the checkpoint's sampling settings must neither apply nor warn.
        temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)
    prompt_length = tensors['input_ids'].shape[1]
    criteria = None
    if on_step is not None:
        criteria = transformers.StoppingCriteriaList(
            [_step_criterion(transformers, torch, on_step, prompt_length, stop_token_ids)])
    output = model.generate(**tensors, generation_config=config, stopping_criteria=criteria)
    generated = output.sequences[:, prompt_length:]
    # Probability of each chosen token: softmax of its logits, computed one step at a time
    # so that only (batch, vocab) floats live at once.
    chosen = []
    for step, logits in enumerate(output.logits):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        chosen.append(log_probs.gather(1, generated[:, step:step + 1]).squeeze(1).exp())
    probs = torch.stack(chosen, dim=1) if chosen else generated.float()
    return trim_at_stop(generated.tolist(), probs.tolist(), stop_token_ids)


def _step_criterion(transformers, torch, on_step: StepHook, prompt_length: int,
                    stop_token_ids: Sequence[int]):
    """``on_step`` as a transformers StoppingCriteria: False from the hook stops every row."""

    class StepCriterion(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            def token_ids():
                rows = input_ids[:, prompt_length:].tolist()
                return trim_at_stop(rows, rows, stop_token_ids)[0]
            keep = on_step(DecodeStep(input_ids.shape[1] - prompt_length, token_ids))
            return torch.full((input_ids.shape[0],), not keep, dtype=torch.bool,
                              device=input_ids.device)

    return StepCriterion()


def trim_at_stop(token_ids, token_probs, stop_token_ids) -> Tuple[TokenIds, TokenProbs]:
    """Cut each row after its first stop token (the stop token is kept)."""
    stops = set(stop_token_ids)
    all_ids, all_probs = [], []
    for row_ids, row_probs in zip(token_ids, token_probs):
        end = len(row_ids)
        for index, token in enumerate(row_ids):
            if token in stops:
                end = index + 1
                break
        all_ids.append(row_ids[:end])
        all_probs.append(row_probs[:end])
    return all_ids, all_probs


def make_generations(tokenizer, token_ids: TokenIds, token_probs: TokenProbs,
                     stop_token_ids: Sequence[int],
                     model_input_sizes: Optional[Sequence[Tuple[int, int]]] = None
                     ) -> List[Generation]:
    """Turn a decoder's output into :class:`Generation` objects (stop token removed)."""
    stops = set(int(token) for token in stop_token_ids)
    sizes = list(model_input_sizes) if model_input_sizes is not None else [None] * len(token_ids)
    generations = []
    for ids, probs, size in zip(token_ids, token_probs, sizes):
        ids, probs = list(ids), [float(prob) for prob in probs]
        if len(ids) != len(probs):
            raise ValueError(f'{len(ids)} token ids but {len(probs)} probabilities')
        stop = None
        if ids and ids[-1] in stops:
            stop = ids.pop()
            probs.pop()
        text, offsets = decode_with_offsets(tokenizer, ids)
        generations.append(Generation(
            text=text, token_ids=ids, token_probs=probs, token_offsets=offsets,
            finished=stop is not None, model_input_size=tuple(size) if size else None,
            stop_token_id=stop))
    return generations


def generate_hf(model, tokenizer, inputs, max_new_tokens: int,
                stop_token_ids: Sequence[int]) -> List[Generation]:
    """``model.generate`` greedy decoding of ``inputs`` into :class:`Generation` objects."""
    ids, probs = hf_decode(model, inputs, max_new_tokens, stop_token_ids)
    return make_generations(tokenizer, ids, probs, stop_token_ids,
                            getattr(inputs, 'model_input_sizes', None))


def decode_with_offsets(tokenizer, token_ids: Sequence[int]) -> Tuple[str, List[Tuple[int, int]]]:
    """Decode ``token_ids`` (special tokens skipped) and give each token its character span.

    Incremental: token ``i`` ends where the text of the first ``i + 1`` tokens ends, less a
    trailing incomplete UTF-8 character (decoded as U+FFFD). Only the tokens since the last
    complete character are decoded again at each step, so this is linear in the length.
    Spans are contiguous, non-decreasing and end at ``len(text)``.
    """
    token_ids = [int(token) for token in token_ids]
    text = _decode(tokenizer, token_ids)
    offsets = []
    start = 0
    anchor, anchor_chars = 0, 0  # tokens and characters up to the last complete character
    for count in range(1, len(token_ids) + 1):
        piece = _decode(tokenizer, token_ids[anchor:count])
        complete = piece.rstrip('\ufffd')
        if text.startswith(complete, anchor_chars):
            end = anchor_chars + len(complete)
            if complete == piece:
                anchor, anchor_chars = count, end
        else:  # a tokenizer whose pieces do not concatenate: decode the whole prefix
            prefix = _decode(tokenizer, token_ids[:count]).rstrip('\ufffd')
            end = common_prefix(text, prefix)
        if count == len(token_ids):
            end = len(text)
        end = min(max(end, start), len(text))
        offsets.append((start, end))
        start = end
    return text, offsets


def _decode(tokenizer, token_ids: List[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)


def common_prefix(first: Sequence, second: Sequence) -> int:
    """How many leading items (characters, token ids) two sequences share."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length
