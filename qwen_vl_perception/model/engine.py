"""The vision-language engine: a loaded Qwen3-VL plus its input builder, answering
``generate(images, instruction, max_new_tokens)``."""
import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from . import cuda_graphs
from .cpu_threads import cpu_threads_for, stop_using_cpu_threads, use_cpu_threads
from .generation import Decoder, DecodeStep, Generation, StepHook, hf_decode, make_generations
from .loading import load_model, model_quantization
from .processor import InputBuilder
from .torch_support import release_cuda_memory, require_torch

PathLike = Union[str, Path]

IM_END = '<|im_end|>'
END_OF_TEXT = '<|endoftext|>'


@dataclass
class GenerateTiming:
    """Seconds spent in the last ``generate`` call: building inputs, decoding, detokenizing."""

    inputs_s: float = 0.0
    decode_s: float = 0.0
    text_s: float = 0.0
    new_tokens: int = 0

    @property
    def total_s(self) -> float:
        return self.inputs_s + self.decode_s + self.text_s


class VisionLanguageEngine:
    """Loads a Qwen3-VL checkpoint once and decodes batches of images greedily.

    ``generate`` may be called from any thread; calls are serialised by a lock.
    ``decoder``: a :class:`~qwen_vl_perception.model.generation.Decoder`, or ``'auto'`` and
    ``'fast'`` (the static-cache
    :class:`~qwen_vl_perception.model.fast_decode.FastGreedyDecoder`, CUDA-graphed on a GPU,
    eager on the CPU) or ``'hf'`` (``model.generate``). ``cpu_threads``: torch's threads for a
    model on the CPU, 0 = auto (:func:`~.cpu_threads.thread_count`), set in the generating
    thread on every call.
    """

    def __init__(self, checkpoint: PathLike, device: str = 'auto', quantization: str = 'auto',
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 decoder: Union[Decoder, str, None] = 'auto', compute_dtype: str = 'auto',
                 cpu_threads: int = 0):
        self.checkpoint = Path(checkpoint)
        self.model = load_model(self.checkpoint, device=device, quantization=quantization,
                                compute_dtype=compute_dtype)
        self.inputs = InputBuilder.from_pretrained(self.checkpoint, min_pixels=min_pixels,
                                                   max_pixels=max_pixels)
        self.tokenizer = self.inputs.tokenizer
        self.decoder: Decoder = self._pick_decoder(decoder)
        self.stop_token_ids = _stop_token_ids(self.model, self.tokenizer)
        self.last_timing = GenerateTiming()
        self._lock = threading.Lock()
        self.cpu_threads: Optional[int] = None
        """torch's intra-op threads when the model is on the CPU (:mod:`.cpu_threads`)."""
        if self.device.type == 'cpu':
            self.cpu_threads = cpu_threads_for(require_torch(), self.model, cpu_threads, self)

    def _pick_decoder(self, decoder) -> Decoder:
        if decoder is None or decoder == 'hf':
            return hf_decode
        if decoder in ('auto', 'fast'):
            from .fast_decode import FastGreedyDecoder
            return FastGreedyDecoder()
        if isinstance(decoder, str):
            raise ValueError(
                f"decoder must be 'auto', 'fast', 'hf' or a callable, not {decoder!r}")
        return decoder

    @property
    def device(self):
        """The torch device of the model's input embeddings (where inputs go)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def quantization(self) -> str:
        """'none', 'nf4', 'fp4', ... as loaded."""
        return model_quantization(self.model)

    @property
    def quantized(self) -> bool:
        return self.quantization != 'none'

    def generate(self, images: Sequence, instruction: str, max_new_tokens: int = 512,
                 on_step: Optional[StepHook] = None) -> List[Generation]:
        """Greedy answers for RGB ``images`` (HxWx3 uint8), one per image, same instruction.

        ``on_step``: told after every token (with the texts so far, on request); False stops
        decoding there and the answers so far come back unfinished.
        """
        if max_new_tokens < 1:
            raise ValueError('max_new_tokens must be at least 1')
        torch = require_torch()
        with self._lock, torch.inference_mode():
            if self.cpu_threads is not None:
                use_cpu_threads(torch, self.cpu_threads)  # in this thread (torch's is per thread)
            if self.model is None:
                raise RuntimeError('the engine is closed')
            started = time.perf_counter()
            inputs = self.inputs.build(list(images), instruction).to(self.device)
            built = time.perf_counter()
            hook = {} if on_step is None else {'on_step': self._with_texts(on_step)}
            ids, probs = self.decoder(self.model, inputs, max_new_tokens, self.stop_token_ids,
                                      **hook)
            decoded = time.perf_counter()
            generations = make_generations(self.tokenizer, ids, probs, self.stop_token_ids,
                                           inputs.model_input_sizes)
            self.last_timing = GenerateTiming(
                inputs_s=built - started, decode_s=decoded - built,
                text_s=time.perf_counter() - decoded,
                new_tokens=sum(len(row) for row in ids))
        return generations

    def _with_texts(self, on_step: StepHook) -> StepHook:
        """``on_step`` with :attr:`DecodeStep.texts` filled in (the tokens so far, decoded)."""
        stops = set(self.stop_token_ids)

        def texts(step: DecodeStep) -> List[str]:
            return [self.tokenizer.decode([t for t in row if t not in stops],
                                          skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)
                    for row in step.token_ids()]

        def hook(step: DecodeStep) -> bool:
            return on_step(DecodeStep(step.count, step.token_ids, lambda: texts(step)))
        return hook

    def close(self) -> None:
        """Drop the model (and free GPU memory); the engine cannot generate afterwards."""
        torch = require_torch()
        with self._lock:
            self.model = None
            stop_using_cpu_threads(torch, self)
            clear = getattr(self.decoder, 'clear', None)
            if clear is not None:
                clear()  # captured CUDA graphs hold the model
        gc.collect()  # sessions dropped without release() go now
        if torch.cuda.is_available():
            with cuda_graphs.LOCK:  # no capture starts meanwhile
                # The library workspaces go too once no kept graph can use them.
                release_cuda_memory(torch, cuda_graphs.library_workspaces_unused())


def _stop_token_ids(model, tokenizer) -> List[int]:
    """<|im_end|>, the tokenizer's eos, the checkpoint's generation_config eos ids and
    <|endoftext|>."""
    candidates = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    eos = model.generation_config.eos_token_id
    candidates += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    candidates.append(tokenizer.convert_tokens_to_ids(END_OF_TEXT))
    stops = []
    for token in candidates:
        if token is not None and token != tokenizer.unk_token_id and int(token) not in stops:
            stops.append(int(token))
    return stops
