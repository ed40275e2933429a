"""Merge a LoRA adapter into its Qwen3-VL base and prove, on a probe input, that it worked.

The result is a plain checkpoint (``AutoModelForImageTextToText`` loads it) with the base's
tokenizer, processor configs and chat template. The check runs one real image and
instruction through :class:`~qwen_vl_perception.model.processor.InputBuilder` and compares
the logits of base+adapter (unmerged PEFT model) with those of the merged model, all in
float32 whatever dtype the result is saved in: the largest absolute difference must stay
within a tolerance far below the adapter's own effect (base vs base+adapter, reported), so
the check tells a merged model from its base; then the checkpoint is reloaded from disk and
must give the logits of the merged weights rounded to the saved dtype. What that rounding
costs is reported too.

Only unquantized bases can take a merge (as ``llamafactory-cli export``): merging into 4-bit
weights would dequantize, add and re-quantize, losing the adapter in rounding. Merge into the
bf16 base, then quantize the merged checkpoint.
"""
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

from ..trained_prompt import copy_prompt_file
from ..model.loading import (ModelLoadError, checkpoint_quantization, load_model,
                             read_checkpoint_config, resolve_device, weight_files)
from .lora import AdapterInfo, apply_adapter, read_adapter
from ..model.pixel_budget import read_pixel_budget, write_pixel_budget
from .probe import probe_image, probe_instruction
from ..model.processor import InputBuilder
from ..model.checkpoint_files import copy_processor_files
from ..model.torch_support import require_torch

PathLike = Union[str, Path]

MERGE_DTYPES = ('bfloat16', 'float16', 'float32')
MERGE_LOG = 'merge_log.json'
RELATIVE_TOLERANCE = 1e-4
"""Default tolerance of the logit check, as a share of the largest |logit| of base+adapter.

The check compares in float32: ``W + BA`` merged once against PEFT adding ``x A B`` to
``x W`` at run time differ by ~1e-6 of the logit scale there (2e-5 against a tolerance of
3.3e-3 on the default model). Compared in bfloat16 instead, rounding alone moved the logits
by 4.7-4.9 % of the largest |logit| on the Qwen3-VL-4B architecture (36 layers), more than
many a trained adapter changes them, so such a check could not tell merged from base. A
broken merge (adapter lost or scaled wrongly, layers missed, tie broken on save) moves the
logits by the adapter's whole effect or, for a broken tie, by far more; whether the adapter's
effect exceeds the tolerance is reported (``LogitCheck.conclusive``)."""


class MergeError(RuntimeError):
    """A merge was refused (e.g. a quantized base); the message says why."""


class MergeCheckError(MergeError):
    """The merged checkpoint was written but failed its check; it must not be used."""


@dataclass
class LogitCheck:
    """Probe-input comparison of base+adapter against the merged checkpoint."""

    max_abs_diff: float
    """merged model vs base+adapter (unmerged), both float32."""
    reload_diff: float
    """checkpoint reloaded from disk vs the merged weights rounded to the saved dtype (should
    be ~0: saving loses nothing)."""
    rounding_diff: float
    """checkpoint reloaded from disk vs base+adapter: what saving in the dtype costs
    (information; 0 up to float32 noise for a float32 result)."""
    adapter_effect: float
    """base vs base+adapter: how much the adapter changes the logits at all."""
    logit_scale: float
    tolerance: float
    top1_agreement: float
    positions: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.reload_diff <= self.tolerance

    @property
    def conclusive(self) -> bool:
        """False when the adapter changes the logits less than the tolerance (an untrained
        adapter): then the check cannot tell merged from base."""
        return self.adapter_effect > self.tolerance


@dataclass
class MergeResult:
    out_dir: str
    dtype: str
    device: str
    check: LogitCheck
    base_weight_bytes: int
    adapter_weight_bytes: int
    merged_weight_bytes: int
    pixel_budget: Optional[List[int]]
    processor_files: List[str] = field(default_factory=list)
    tied_embeddings_kept: Optional[bool] = None
    seconds: float = 0.0


def default_tolerance(logit_scale: float) -> float:
    """The check's tolerance at a given logit scale (see RELATIVE_TOLERANCE)."""
    return RELATIVE_TOLERANCE * max(1.0, float(logit_scale))


def check_mergeable_base(base: PathLike) -> dict:
    """The base's config.json; :class:`MergeError` for a quantized base, ModelLoadError for
    a folder that is not a Qwen3-VL checkpoint."""
    config = read_checkpoint_config(base)
    quantization = checkpoint_quantization(config)
    if quantization != 'none':
        raise MergeError(
            f'the base {base} is quantized ({quantization}); a LoRA adapter cannot be merged '
            'into quantized weights (they would be dequantized, added to and re-quantized, '
            'and the adapter lost in rounding; llamafactory-cli export refuses this too). '
            'Merge into the unquantized bf16 base (e.g. Qwen/Qwen3-VL-4B-Instruct), then '
            'quantize the merged checkpoint with tools/quantize.py')
    return config


def merge_lora(base: PathLike, adapter: PathLike, out_dir: PathLike, dtype: str = 'bfloat16',
               device: str = 'auto', tolerance: Optional[float] = None,
               probe_image_path: Optional[PathLike] = None,
               instruction: Optional[str] = None, min_pixels: Optional[int] = None,
               max_pixels: Optional[int] = None,
               log: Callable[[str], None] = print) -> MergeResult:
    """Merge ``adapter`` into ``base``, save to ``out_dir`` (must exist) and check it.

    Raises :class:`MergeError` when refused (quantized base), :class:`MergeCheckError` when
    the check fails (the files stay, with ``merge_log.json`` saying so),
    :class:`~.lora.AdapterError` for an unusable adapter and
    :class:`~.loading.ModelLoadError` for an unusable base.
    Pixel budget written to the result: ``min_pixels``/``max_pixels`` if given, else the
    adapter's (this project's fine-tune stores the one it trained with), else the base's.
    """
    if dtype not in MERGE_DTYPES:
        raise ValueError(f'dtype must be one of {", ".join(MERGE_DTYPES)}, not {dtype!r}')
    started = time.perf_counter()
    check_mergeable_base(base)
    info = read_adapter(adapter)
    torch = require_torch()
    device = resolve_device(device)
    out_dir = Path(out_dir)

    processor_source = base if _has_processor_files(base) else Path(adapter)
    budget = _pixel_budget(base, adapter, min_pixels, max_pixels)
    builder = InputBuilder.from_pretrained(processor_source, *(budget or (None, None)))
    image = probe_image(probe_image_path)
    inputs = builder.build([image], instruction or probe_instruction(adapter))
    log(f'probe: {image.shape[1]}x{image.shape[0]} image, {inputs.prompt_length} tokens '
        f'(tokenizer and processor from {processor_source})')

    log(f'loading the base {base} (float32 for merging and the check, {device})')
    model = load_model(base, device=device, quantization='none', compute_dtype='float32')
    tied = bool(getattr(model.config.get_text_config(), 'tie_word_embeddings', False)
                or getattr(model.config, 'tie_word_embeddings', False))
    peft_model = apply_adapter(model, info)
    device_inputs = inputs.to(peft_model.get_base_model().device).tensors
    with torch.inference_mode():
        adapted = _logits(peft_model, device_inputs)
        with peft_model.disable_adapter():
            base_logits = _logits(peft_model, device_inputs)
        log('merging')
        merged = peft_model.merge_and_unload()
        merged_logits = _logits(merged, device_inputs)
        # The weights as they are saved, rounded to ``dtype``, computed in float32 as they
        # reload (parameters only: buffers such as rotary frequencies are not saved).
        rounded_logits = merged_logits
        if dtype != 'float32':
            for parameter in merged.parameters():
                parameter.data = parameter.data.to(getattr(torch, dtype)).float()
            rounded_logits = _logits(merged, device_inputs)
    merged = merged.to(getattr(torch, dtype))
    merged.config.dtype = getattr(torch, dtype)
    merged.save_pretrained(str(out_dir))
    del merged, peft_model, model
    copied = copy_processor_files(processor_source, out_dir)
    if budget is not None:
        write_pixel_budget(out_dir, *budget)
    copy_prompt_file(adapter, out_dir)
    _free(torch)

    log(f'reloading the merged checkpoint from {out_dir}')
    reloaded = load_model(out_dir, device=device, quantization='none', compute_dtype='float32')
    tied_kept = None
    if tied:
        tied_kept = (reloaded.get_output_embeddings().weight.data_ptr()
                     == reloaded.get_input_embeddings().weight.data_ptr())
    with torch.inference_mode():
        reloaded_logits = _logits(reloaded, device_inputs)
    del reloaded
    _free(torch)

    scale = float(adapted.abs().max())
    check = LogitCheck(
        max_abs_diff=_max_diff(merged_logits, adapted),
        reload_diff=_max_diff(reloaded_logits, rounded_logits),
        rounding_diff=_max_diff(reloaded_logits, adapted),
        adapter_effect=_max_diff(base_logits, adapted),
        logit_scale=scale,
        tolerance=float(tolerance) if tolerance is not None else default_tolerance(scale),
        top1_agreement=float((reloaded_logits.argmax(-1) == adapted.argmax(-1)).float().mean()),
        positions=int(adapted.shape[0]))
    files = weight_files(out_dir)
    result = MergeResult(
        out_dir=str(out_dir), dtype=dtype, device=device, check=check,
        base_weight_bytes=sum(path.stat().st_size for path in weight_files(base)),
        adapter_weight_bytes=info.weights_file.stat().st_size,
        merged_weight_bytes=sum(path.stat().st_size for path in files),
        pixel_budget=list(budget) if budget else None, processor_files=copied,
        tied_embeddings_kept=tied_kept, seconds=time.perf_counter() - started)
    _write_log(out_dir, base, info, result)
    if tied_kept is False:
        raise MergeCheckError(f'the merged checkpoint in {out_dir} reloads with lm_head no '
                              'longer tied to embed_tokens (peft#2018); do not use it')
    if not check.passed:
        raise MergeCheckError(
            f'the merged checkpoint in {out_dir} does not reproduce base+adapter on the probe: '
            f'max |logit difference| {check.max_abs_diff:.4g} (reloaded from disk vs as saved '
            f'{check.reload_diff:.4g}) exceeds the tolerance {check.tolerance:.4g}; do not '
            'use it')

    return result


def _has_processor_files(folder) -> bool:
    folder = Path(folder)
    return (folder / 'preprocessor_config.json').is_file() and (
        (folder / 'tokenizer.json').is_file() or (folder / 'vocab.json').is_file())


def _pixel_budget(base, adapter, min_pixels, max_pixels):
    source = read_pixel_budget(adapter) or read_pixel_budget(base)
    if min_pixels is None and max_pixels is None:
        return source
    low = min_pixels if min_pixels is not None else (source or (None, None))[0]
    high = max_pixels if max_pixels is not None else (source or (None, None))[1]
    if low is None or high is None:
        raise ValueError('give both --min-pixels and --max-pixels: the base has no '
                         'preprocessor_config.json budget to complete them')
    if not 0 < low <= high:
        raise ValueError(f'need 0 < min_pixels <= max_pixels, got {low} and {high}')
    return int(low), int(high)


def _logits(model, tensors):
    """Float32 logits of the one probe sequence, on the CPU: (positions, vocabulary)."""
    output = model(**tensors, use_cache=False)
    return output.logits[0].float().cpu()


def _max_diff(first, second) -> float:
    return float((first - second).abs().max())


def _free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_log(out_dir: Path, base, info: AdapterInfo, result: MergeResult) -> None:
    log = {'base': str(base), 'adapter': str(info.path),
           'adapter_base_model': info.base_model_name, 'lora_rank': info.rank,
           'lora_alpha': info.config.get('lora_alpha'),
           'target_modules': info.config.get('target_modules'),
           'check_passed': result.check.passed, 'check_conclusive': result.check.conclusive,
           **asdict(result)}
    (out_dir / MERGE_LOG).write_text(json.dumps(log, indent=2, default=str) + '\n')


__all__ = ['LogitCheck', 'MERGE_DTYPES', 'MergeCheckError', 'MergeError', 'MergeResult',
           'ModelLoadError', 'check_mergeable_base', 'default_tolerance', 'merge_lora']
