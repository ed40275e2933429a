#!/usr/bin/env python3
"""Benchmark Qwen3-VL frame latency: the article's pattern against FastGreedyDecoder.

The article's pattern is ``model.generate`` on a bitsandbytes NF4 model (double quantization,
float16 compute, every linear layer but ``lm_head`` quantized). Our engine is
:class:`~qwen_vl_perception.model.fast_decode.FastGreedyDecoder` on the same model, and on the
model as the project loads it (``nf4``: language model NF4 with the model's dtype as compute
dtype, vision tower and ``lm_head`` unquantized) and unquantized (``bf16``; float32 on CPU).

Without ``--model`` the Qwen3-VL-4B architecture is built with random weights directly on the
device (latency does not depend on weight values); ``--tiny`` uses the tiny test
architecture. The input is a ``--image`` sized picture and the node's real prompt (the
article's categories, ``describe=True``) built by the project's InputBuilder. Answer lengths
are forced (no stop tokens) to each ``--new-tokens``.

Reported per configuration: prefill ms, decode ms/token, frame latency, frames/s (batch /
frame latency) and peak device memory (``torch.cuda.max_memory_allocated``, weights included).
``--agreement-tokens`` also compares our tokens with ``model.generate`` greedy (stop tokens
on) on a left-padded batch of three frames of two image sizes.

With ``--server URL`` it times a served model instead (the ``openai`` backend, see
``qwen_vl_perception/backends/throughput.py``): latency and frames/s at each ``--in-flight``
count of requests at once, beside the local engine on ``--model`` at each ``--batch-sizes``
(unless ``--no-local``), on the same images (``--images``, else ``--frames`` synthetic scenes
at ``--image`` size) with the same instruction (the model's ``detection_prompt.json``, else the
article's categories) and ``--max-new-tokens``.

Examples::

    python3 tools/benchmark.py --out results/benchmark/gpu.json
    python3 tools/benchmark.py --device cpu --tiny --out results/benchmark/cpu.json
    python3 tools/benchmark.py --server http://127.0.0.1:8000/v1 --model default --device cpu \
        --out results/benchmark/served-cpu.json
"""
import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qwen_vl_perception.categories import ARTICLE_CATEGORIES
from qwen_vl_perception.model.configs import qwen3_vl_4b_config, tiny_config
from qwen_vl_perception.model.default_model import DEFAULT_MODEL_NAME, resolve_model_path
from qwen_vl_perception.model.fast_decode import FastGreedyDecoder
from qwen_vl_perception.model.torch_support import require, require_torch
from qwen_vl_perception.prompt import PromptBuilder

VARIANTS = ('bf16', 'nf4', 'nf4-all', 'article')
"""What ``--variants`` can time; "article" is the model of the blog post the project grew from
("Qwen3-VL + LoRA SFT + 4-bit quantization", see README.md): NF4 with float16 compute."""
TRISTATE = {'auto': None, 'on': True, 'off': False}
"""``--fuse`` and ``--nf4-kernel`` as FastGreedyDecoder takes them."""
GB = 1e9


def parse_pair(text):
    """``'640x480'`` -> ``(640, 480)``; also ``BATCHxTOKENS`` (``'8x80'``)."""
    first, second = (int(value) for value in text.lower().split('x'))
    return first, second


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'``."""
    return str(dtype).replace('torch.', '')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--device', default=None, choices=('cuda', 'cpu'),
                        help='where to run (default: cuda if available)')
    parser.add_argument('--tiny', action='store_true',
                        help='the tiny test architecture instead of the 4B one')
    parser.add_argument('--model', type=Path, default=None,
                        help='an unquantized Qwen3-VL checkpoint folder instead of random '
                             f"weights, or '{DEFAULT_MODEL_NAME}' (the project's "
                             'synthetic-scenes model, its float32 form)')
    parser.add_argument('--image', default='640x480', help='WIDTHxHEIGHT of the test image')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 4, 8])
    parser.add_argument('--new-tokens', type=int, nargs='+', default=[150, 80])
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per configuration')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS,
                        help='bf16: unquantized; nf4: language model NF4 (project loading); '
                             'nf4-all: every linear but lm_head NF4, model-dtype compute; '
                             "article: nf4-all with float16 compute (the article's model)")
    parser.add_argument('--article-runs', nargs='*', default=['1x150', '1x80', '8x80'],
                        help="model.generate runs on the article's model, BATCHxTOKENS")
    parser.add_argument('--article-repeats', type=int, default=2,
                        help='timed model.generate runs per article configuration')
    parser.add_argument('--profile', action='store_true',
                        help='write kernel-time tables of eager decode steps (CUDA)')
    parser.add_argument('--agreement-tokens', type=int, default=64,
                        help='tokens for the agreement check with model.generate (0: skip)')
    parser.add_argument('--fuse', default='auto', choices=('auto', 'on', 'off'),
                        help='fuse the decode step elementwise work with torch.compile')
    parser.add_argument('--unfused-check', action='store_true',
                        help='also time our engine unfused (batch 1, first --new-tokens)')
    parser.add_argument('--nf4-kernel', default='auto', choices=('auto', 'on', 'off'),
                        help="NF4 decode linears through the project's fused Triton kernel "
                             "(auto: on CUDA with Triton) or bitsandbytes' own path")
    parser.add_argument('--bnb-check', nargs='*', default=[], metavar='BATCHxTOKENS',
                        help="also time the nf4 variant with bitsandbytes' own decode "
                             'linears (no fused kernel) at these configurations, e.g. 1x80 8x80')
    parser.add_argument('--linear-rows', type=int, nargs='*', default=[],
                        help="CUDA: time one decode step's NF4 linears alone (CUDA graph of "
                             "every layer's seven) at these row counts, fused kernel against "
                             'bitsandbytes')
    parser.add_argument('--linears-only', action='store_true',
                        help='CUDA: quantize as the nf4 variant, run --linear-rows and '
                             '--lm-head-check, nothing else')
    parser.add_argument('--lm-head-check', action='store_true',
                        help='CUDA: time lm_head in bf16 against an 8-bit (fp8, per-row '
                             'scales) decode-only copy, and their top-1 agreement on the '
                             "model's final hidden states of the agreement batch")
    parser.add_argument('--memory-processes', action='store_true',
                        help='CUDA: measure the batch-1 peak memory of nf4 and nf4-all each in '
                             'a fresh process (nothing left over from other runs)')
    parser.add_argument('--memory-only', default=None, choices=('nf4', 'nf4-all'),
                        help=argparse.SUPPRESS)  # one such process; prints JSON
    parser.add_argument('--cpu-time', action='store_true',
                        help='CPU only: one torch thread, time with the process CPU clock '
                             '(fair on a machine shared with other jobs)')
    parser.add_argument('--out', type=Path, default=None, help='write the results as JSON')
    served = parser.add_argument_group('a served model (--server)')
    served.add_argument('--server', default=None, metavar='URL',
                        help="an OpenAI-compatible server's API base, e.g. "
                             'http://gpu-box:8000/v1: time it instead (see above)')
    served.add_argument('--server-model', default='', metavar='NAME',
                        help="the served model's name (default: the server's only model)")
    served.add_argument('--server-api-key-env', default='', metavar='VAR',
                        help='the name of an environment variable holding the API key')
    served.add_argument('--server-timeout', type=float, default=300.0, metavar='S',
                        help='seconds a request may take (default %(default)s)')
    served.add_argument('--in-flight', type=int, nargs='+', default=[1, 4, 8], metavar='K',
                        help='requests at once (default: 1 4 8)')
    served.add_argument('--frames', type=int, default=16,
                        help='images per run (default %(default)s)')
    served.add_argument('--images', type=Path, default=None,
                        help='a folder of images to send (default: synthetic scenes)')
    served.add_argument('--max-new-tokens', type=int, default=256,
                        help='longest answer (default %(default)s)')
    served.add_argument('--no-local', action='store_true',
                        help='time only the server (the local engine cannot run --model here)')
    return parser.parse_args(argv)


# -- building the model -------------------------------------------------------------------

def build_model(torch, transformers, args, device, dtype):
    if args.model is not None:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            str(args.model), dtype=dtype, device_map={'': str(device)})
        if getattr(model.config, 'quantization_config', None) is not None:
            raise SystemExit('--model must be an unquantized checkpoint (it is quantized here)')
        return model.eval()
    config = transformers.Qwen3VLConfig(**(tiny_config() if args.tiny else qwen3_vl_4b_config()))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def quantize_linears(torch, model, compute_dtype, skip, double_quant=True) -> int:
    """Replace ``nn.Linear`` layers (not under a name in ``skip``) by bitsandbytes NF4 ones,
    as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))``
    does on load. Returns how many were replaced."""
    bnb = require('bitsandbytes', 'to quantize to NF4')
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f'{parent_name}.{name}' if parent_name else name
            if type(child) is not torch.nn.Linear or any(
                    part in skip for part in full_name.split('.')):
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type='nf4',
                device='meta')
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=double_quant,
                quant_type='nf4', module=quantized).to(child.weight.device)
            if child.bias is not None:
                quantized.bias = child.bias
            setattr(parent, name, quantized)
            count += 1
    return count


def set_compute_dtype(model, dtype) -> None:
    for module in model.modules():
        if hasattr(module, 'compute_dtype') and hasattr(module.weight, 'quant_state'):
            module.compute_dtype = dtype


# -- inputs ---------------------------------------------------------------------------------

def make_input_builder(args, workdir: Path):
    from qwen_vl_perception.model.processor import InputBuilder
    if args.model is not None:
        return InputBuilder.from_pretrained(args.model)
    from qwen_vl_perception.pipeline.tiny import make_tiny_checkpoint
    # The tiny checkpoint carries the real tokenizer, image processor and chat template.
    return InputBuilder.from_pretrained(make_tiny_checkpoint(workdir / 'processor'))


def test_image(width, height, seed):
    """A structured RGB picture (gradients and blocks), not flat noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                      (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    for _ in range(8):
        x0, y0 = rng.integers(0, width - 32), rng.integers(0, height - 32)
        image[y0:y0 + rng.integers(16, 96), x0:x0 + rng.integers(16, 96)] = rng.integers(
            0, 256, 3)
    return image


# -- timing ----------------------------------------------------------------------------------

class Timer:
    """Wall clock (device synchronised), or with ``cpu_time`` the process's CPU time: on a
    CPU shared with other jobs that measures the work done, not the wait for a core."""

    def __init__(self, torch, device, cpu_time=False):
        self.torch, self.device, self.cpu_time = torch, device, cpu_time
        self.clock = time.process_time if cpu_time else time.perf_counter

    def sync(self):
        if self.device.type == 'cuda':
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.device.type == 'cuda':
            self.sync()
            gc.collect()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        if self.device.type != 'cuda':
            return None
        return self.torch.cuda.max_memory_allocated(self.device) / GB

    def allocated_gb(self):
        if self.device.type != 'cuda':
            return None
        return self.torch.cuda.memory_allocated(self.device) / GB

    def seconds(self, function):
        self.sync()
        started = self.clock()
        result = function()
        self.sync()
        return self.clock() - started, result


def time_ours(torch, timer, decoder, model, tensors, batch, new_tokens, repeats, label):
    timer.reset_peak()
    first_s, _ = timer.seconds(lambda: decoder(model, tensors, new_tokens, []))
    captured = decoder.last_timing.graph_captured
    frames, prefills, decodes = [], [], []
    for _ in range(repeats):
        seconds, (ids, _) = timer.seconds(lambda: decoder(model, tensors, new_tokens, []))
        assert all(len(row) == new_tokens for row in ids), 'forced length not reached'
        timing = decoder.last_timing
        frames.append(seconds)
        prefills.append(timing.prefill_s)
        decodes.append(timing.decode_ms_per_token)
    frame = float(np.median(frames))
    prefill_s = float(np.median(prefills))
    decode_ms = float(np.median(decodes))
    if timer.cpu_time:  # the decoder's own timings are wall clock: measure as for generate
        prefill_s = float(np.median([
            timer.seconds(lambda: decoder(model, tensors, 1, []))[0] for _ in range(repeats)]))
        decode_ms = 1000 * (frame - prefill_s) / max(new_tokens - 1, 1)
    return {
        'engine': 'ours', 'label': label, 'batch': batch, 'new_tokens': new_tokens,
        'prefill_ms': 1000 * prefill_s, 'decode_ms_per_token': decode_ms,
        'frame_s': frame, 'frames_per_s': batch / frame, 'frame_s_runs': frames,
        'first_call_s': first_s, 'first_call_captured_graph': captured,
        'peak_gb': timer.peak_gb(), 'fused': decoder.last_session_fused,
        'nf4_kernel_layers': decoder.last_session_nf4_layers}


def time_generate(torch, timer, model, tensors, batch, new_tokens, repeats, label):
    def generate(count):
        return model.generate(**tensors, max_new_tokens=count, min_new_tokens=count,
                              do_sample=False, temperature=None, top_k=None, top_p=None)

    timer.reset_peak()
    generate(2)  # warm-up
    prefill_s, _ = timer.seconds(lambda: generate(1))
    frames = []
    for _ in range(repeats):
        seconds, output = timer.seconds(lambda: generate(new_tokens))
        assert output.shape[1] - tensors['input_ids'].shape[1] == new_tokens
        frames.append(seconds)
    frame = float(np.median(frames))
    return {
        'engine': 'generate', 'label': label, 'batch': batch, 'new_tokens': new_tokens,
        'prefill_ms': 1000 * prefill_s,
        'decode_ms_per_token': 1000 * (frame - prefill_s) / max(new_tokens - 1, 1),
        'frame_s': frame, 'frames_per_s': batch / frame, 'frame_s_runs': frames,
        'peak_gb': timer.peak_gb()}


def agreement(model, decoders, tensors, new_tokens, label):
    """Our tokens against ``model.generate`` greedy (``hf_decode``), forced to ``new_tokens``.

    ``sequences_identical`` and ``tokens_before_first_difference`` compare free-running
    outputs (one near-tie changes everything after it); ``per_token`` is teacher forced: our
    choice at each position given generate's tokens before it.
    """
    from qwen_vl_perception.model.generation import hf_decode
    reference, _ = hf_decode(model, tensors, new_tokens, [])
    entry = {'label': label, 'new_tokens': new_tokens, 'rows': len(reference)}
    for name, decoder in decoders.items():
        ours, _ = decoder(model, tensors, new_tokens, [])
        common = []
        for ref_row, row in zip(reference, ours):
            count = 0
            for a, b in zip(ref_row, row):
                if a != b:
                    break
                count += 1
            common.append(count)
        choices = decoder.choices_given(model, tensors, reference)
        same = sum(a == b for ref_row, row in zip(reference, choices)
                   for a, b in zip(ref_row, row))
        entry[name] = {
            'sequences_identical': sum(a == b for a, b in zip(reference, ours)) / len(ours),
            'tokens_before_first_difference': sum(common) / (new_tokens * len(ours)),
            'common_prefix_per_row': common,
            'per_token': same / (new_tokens * len(reference))}
        decoder.clear()
    return entry


def profile_step(torch, decoder, model, tensors, path, steps=3):
    """Kernel times of eager decode steps (no graph): where a step's GPU time goes."""
    decoder(model, tensors, 8, [])
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.step_eagerly(steps)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel rows only: operator rows repeat their kernels' time.
    from torch.autograd import DeviceType
    device_us = sum(event.self_device_time_total for event in events
                    if getattr(event, 'device_type', None) == DeviceType.CUDA) / steps
    text = events.table(sort_by='self_cuda_time_total', row_limit=30)
    path.write_text(f'GPU kernel time per step: {device_us / 1000:.3f} ms\n{text}\n')
    decoder.clear()
    return device_us / 1000


def instruction_prefill(torch, timer, model, tensors, repeats):
    """The language model's prefill of the text before the image alone (batch 1): the most
    that reusing the instruction's KV cache across frames could save per frame."""
    from qwen_vl_perception.model.configs import VISION_START_TOKEN_ID
    from qwen_vl_perception.model.fast_decode import text_model_parts
    ids = tensors['input_ids'][:1]
    start = int((ids[0] == VISION_START_TOKEN_ID).nonzero()[0])
    prefix = ids[:, :start]
    language_model = model.model.language_model
    text_model_parts(model)  # a Qwen3-VL, as the rest of the tool assumes
    language_model(input_ids=prefix, use_cache=True)
    seconds = [timer.seconds(lambda: language_model(input_ids=prefix, use_cache=True))[0]
               for _ in range(repeats)]
    return {'tokens': start, 'ms': 1000 * float(np.median(seconds))}


DECODE_LINEARS = (('self_attn', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
                  ('mlp', ('gate_proj', 'up_proj', 'down_proj')))
DECODE_GROUPS = (('self_attn', ('q_proj', 'k_proj', 'v_proj')), ('self_attn', ('o_proj',)),
                 ('mlp', ('gate_proj', 'up_proj')), ('mlp', ('down_proj',)))
"""A decode step's launches when the layers sharing an input go together (FastGreedyDecoder)."""
SINGLE_TIMINGS = (('self_attn', 'q_proj'), ('self_attn', 'k_proj'), ('mlp', 'gate_proj'))


def nf4_bytes(modules):
    """Bytes a product reads of these NF4 layers: packed codes and first-level absmax."""
    return sum(module.weight.data.numel() * module.weight.data.element_size()
               + module.weight.quant_state.absmax.numel()
               * module.weight.quant_state.absmax.element_size() for module in modules)


def graph_ms(torch, calls, replays):
    """Device milliseconds of one replay of a CUDA graph of ``calls`` (after a warm-up run,
    which also tunes the NF4 kernel's launch shapes), and the calls' outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [call() for call in calls]
    graph.replay()
    torch.cuda.synchronize()
    # Copies: the graph's outputs live in its memory pool, which the next graph reuses.
    outputs = [[part.clone() for part in out] if isinstance(out, (list, tuple)) else out.clone()
               for out in outputs]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    milliseconds = start.elapsed_time(end) / replays
    graph.reset()
    return milliseconds, outputs


def linear_step(torch, model, rows_list, dtype, replays=20):
    """Device time of one decode step's NF4 linears (every layer's seven, one CUDA graph):
    bitsandbytes' ``Linear4bit.forward``, the NF4 kernel one layer per launch, and the kernel
    with each layer's (q, k, v) and (gate, up) in one launch as the decoder runs them; then
    each launch shape alone (a graph of its launches over all layers: the weights stream
    from memory as in a step). Per row count."""
    from qwen_vl_perception.model.fast_decode import text_model_parts
    from qwen_vl_perception.model.nf4_matmul import NF4Matmul
    layers = text_model_parts(model).layers
    modules = [getattr(getattr(layer, owner), name) for layer in layers
               for owner, names in DECODE_LINEARS for name in names]
    matmul = NF4Matmul()
    fused = [matmul.linear_for(module) for module in modules]
    if any(function is None for function in fused):
        raise ValueError('not every decode linear is NF4 on CUDA')
    groups = []  # (name, modules, function returning a list of outputs)
    for layer in layers:
        for owner, names in DECODE_GROUPS:
            members = [getattr(getattr(layer, owner), name) for name in names]
            if len(members) > 1:
                function = matmul.group_linear_for(members)
                if function is None:
                    raise ValueError(f'{names} cannot share a launch')
            else:
                single = matmul.linear_for(members[0])
                function = (lambda single: lambda x: [single(x)])(single)
            groups.append(('+'.join(names), members, function))
    weight_bytes = nf4_bytes(modules)
    rows_results = []
    for rows in rows_list:
        inputs = {}  # the layers of a group get one input, as in a decode step
        for _, members, _ in groups:
            x = torch.randn(rows, 1, members[0].in_features, device='cuda', dtype=dtype)
            inputs.update((member, x) for member in members)
        entry = {'rows': rows, 'layers': len(modules), 'launches_grouped': len(groups),
                 'weights_gb': weight_bytes / GB}
        outputs = {}
        for name, calls in (
                ('bitsandbytes', [(lambda m: lambda: m(inputs[m]))(m) for m in modules]),
                ('fused', [(lambda f, m: lambda: f(inputs[m]))(f, m)
                           for f, m in zip(fused, modules)]),
                ('fused_grouped', [(lambda f, m: lambda: f(inputs[m[0]]))(f, m)
                                   for _, m, f in groups])):
            milliseconds, outputs[name] = graph_ms(torch, calls, replays)
            entry[f'{name}_ms'] = milliseconds
            entry[f'{name}_tb_per_s'] = weight_bytes / milliseconds / 1e9
        grouped_flat = [out for outs in outputs['fused_grouped'] for out in outs]
        entry['max_relative_difference'] = max(
            float((a.float() - b.float()).abs().max() / b.float().abs().max())
            for a, b in zip(outputs['fused'] + grouped_flat,
                            outputs['bitsandbytes'] + outputs['bitsandbytes']))
        per_shape = []
        for name in dict.fromkeys(name for name, _, _ in groups):  # as the decoder launches
            chosen = [(members, function) for group, members, function in groups
                      if group == name]
            per_shape.append(shape_timing(torch, name, [members for members, _ in chosen], [
                (lambda f, m: lambda: f(inputs[m[0]]))(function, members)
                for members, function in chosen], replays))
        for owner, name in SINGLE_TIMINGS:  # the grouped layers one per launch, for comparison
            chosen = [getattr(getattr(layer, owner), name) for layer in layers]
            per_shape.append(shape_timing(torch, name, [[module] for module in chosen], [
                (lambda f, m: lambda: f(inputs[m]))(matmul.linear_for(module), module)
                for module in chosen], replays))
        entry['per_shape'] = per_shape
        rows_results.append(entry)
        print(f"linears of one decode step, {rows} rows: bitsandbytes "
              f"{entry['bitsandbytes_ms']:.3f} ms ({entry['bitsandbytes_tb_per_s']:.2f} TB/s), "
              f"fused {entry['fused_ms']:.3f} ms ({entry['fused_tb_per_s']:.2f} TB/s), "
              f"grouped {entry['fused_grouped_ms']:.3f} ms "
              f"({entry['fused_grouped_tb_per_s']:.2f} TB/s), max relative difference "
              f"{entry['max_relative_difference']:.2e}", flush=True)
        for shape in per_shape:
            print(f"  {shape['layers']:28} {str(shape['out_features']):20} x "
                  f"{shape['in_features']:5}: {shape['us_per_launch']:7.2f} us per launch, "
                  f"{shape['tb_per_s']:.2f} TB/s", flush=True)
    return {'rows': rows_results, 'launch_shapes': matmul.tuned_shapes()}


def shape_timing(torch, name, member_lists, calls, replays):
    """One launch shape over all layers (a CUDA graph of ``calls``): microseconds per launch
    and the NF4 bytes read per second."""
    milliseconds, _ = graph_ms(torch, calls, replays)
    members = member_lists[0]
    return {'layers': name, 'out_features': [module.out_features for module in members],
            'in_features': members[0].in_features, 'launches': len(calls),
            'us_per_launch': 1000 * milliseconds / len(calls),
            'tb_per_s': nf4_bytes([m for ms in member_lists for m in ms]) / milliseconds / 1e9}


def lm_head_check(torch, model, tensors, rows_list, replays=20):
    """lm_head's decode-step time in bf16 against an 8-bit copy (fp8 e4m3 weights with
    per-row scales, the input row-scaled to fp8 too: cuBLASLt's ``_scaled_mm``), and how often
    their greedy choice agrees, each against float32 logits, over every position of
    ``tensors``' prompts (the model's final hidden states)."""
    head = model.get_output_embeddings().weight
    fp8 = torch.float8_e4m3fn
    limit = torch.finfo(fp8).max
    weight_scale = head.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / limit
    weight8 = (head.float() / weight_scale).to(fp8)

    def head8(x):
        rows = x.shape[0]
        padded = torch.zeros(-(-rows // 16) * 16, x.shape[1], dtype=x.dtype, device=x.device)
        padded[:rows] = x
        x_scale = padded.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / limit
        x8 = (padded.float() / x_scale).to(fp8)
        out = torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                               out_dtype=torch.bfloat16)
        return out[:rows]

    result = {'vocab': head.shape[0], 'hidden': head.shape[1],
              'bf16_gb': head.numel() * head.element_size() / GB,
              'fp8_gb': (weight8.numel() + weight_scale.numel() * 4) / GB, 'rows': []}
    for rows in rows_list:
        x = torch.randn(rows, head.shape[1], device=head.device, dtype=head.dtype)
        bf16_ms, _ = graph_ms(torch, [lambda: torch.nn.functional.linear(x, head)], replays)
        fp8_ms, _ = graph_ms(torch, [lambda: head8(x)], replays)
        result['rows'].append({'rows': rows, 'bf16_ms': bf16_ms, 'fp8_ms': fp8_ms,
                               'bf16_tb_per_s': result['bf16_gb'] / bf16_ms,
                               'fp8_tb_per_s': result['fp8_gb'] / fp8_ms})
    inner = model.model
    output = inner(**{name: value for name, value in tensors.items()
                      if name in ('input_ids', 'attention_mask', 'pixel_values',
                                  'image_grid_thw', 'mm_token_type_ids')})
    hidden = output.last_hidden_state[tensors['attention_mask'].bool()]  # (positions, hidden)
    exact = (hidden.float() @ head.float().T).argmax(-1)
    bf16 = torch.nn.functional.linear(hidden, head).float().argmax(-1)
    eight = torch.cat([head8(chunk) for chunk in hidden.split(256)]).float().argmax(-1)
    result.update(positions=int(hidden.shape[0]),
                  bf16_vs_fp32=float((bf16 == exact).float().mean()),
                  fp8_vs_fp32=float((eight == exact).float().mean()),
                  fp8_vs_bf16=float((eight == bf16).float().mean()))
    print(f'lm_head: {result}', flush=True)
    return result


def memory_only(args):
    """One fresh process, one quantized variant: resident weights, then the peak of a first
    batch-1 frame (tuning, capture) and of a steady one. Prints one JSON line."""
    torch = require_torch()
    transformers = require('transformers', 'to build Qwen3-VL')
    device, dtype = torch.device('cuda'), torch.bfloat16
    width, height = parse_pair(args.image)
    new_tokens = args.new_tokens[0]
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        builder = make_input_builder(args, Path(workdir))
        instruction = PromptBuilder(ARTICLE_CATEGORIES, describe=True).instruction
        tensors = builder.build([test_image(width, height, 0)], instruction).to(device).tensors
        model = build_model(torch, transformers, args, device, dtype)
        skip = ('lm_head', 'visual') if args.memory_only == 'nf4' else ('lm_head',)
        quantize_linears(torch, model, dtype, skip=skip)
        gc.collect()
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        decoder = FastGreedyDecoder(fuse_elementwise=TRISTATE[args.fuse],
                                    nf4_kernel=TRISTATE[args.nf4_kernel])
        decoder(model, tensors, new_tokens, [])
        first = torch.cuda.max_memory_allocated(device)
        first_reserved = torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        decoder(model, tensors, new_tokens, [])
        steady = torch.cuda.max_memory_allocated(device)
        result = {'variant': args.memory_only, 'batch': 1, 'new_tokens': new_tokens,
                  'weights_gb': weights / GB, 'first_frame_peak_gb': first / GB,
                  'first_frame_peak_reserved_gb': first_reserved / GB,
                  'steady_frame_peak_gb': steady / GB,
                  'steady_frame_peak_reserved_gb': torch.cuda.max_memory_reserved(device) / GB,
                  'nf4_kernel_layers': decoder.last_session_nf4_layers}
    print(json.dumps(result), flush=True)
    return result


def memory_processes(args, variants):
    """Run :func:`memory_only` in a fresh process per variant; their JSON results."""
    results = []
    for variant in variants:
        command = [sys.executable, str(Path(__file__).resolve()), '--memory-only', variant,
                   '--image', args.image, '--new-tokens', str(args.new_tokens[0]),
                   '--nf4-kernel', args.nf4_kernel, '--fuse', args.fuse]
        if args.tiny:
            command.append('--tiny')
        if args.model is not None:
            command += ['--model', str(args.model)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
        if done.returncode != 0 or not lines:
            results.append({'variant': variant, 'error': done.stderr[-2000:]})
        else:
            results.append(json.loads(lines[-1]))
        print(f'memory, fresh process, {variant}: {results[-1]}', flush=True)
    return results


# -- the benchmark ---------------------------------------------------------------------------

class Benchmark:
    """One process's benchmark: the inputs, the model (quantized in place phase by phase), one
    decoder, and the ``results`` written to ``--out`` after every step (partial results count).
    Each check records an error and goes on rather than losing the runs before it."""

    def __init__(self, args, torch, device, results):
        self.args, self.torch, self.device, self.results = args, torch, device, results
        self.on_cuda = device.type == 'cuda'
        self.dtype = torch.bfloat16 if self.on_cuda else torch.float32
        self.dtype_name = dtype_name(self.dtype)
        self.fuse = TRISTATE[args.fuse]
        self.nf4_kernel = TRISTATE[args.nf4_kernel]
        self.width, self.height = parse_pair(args.image)
        self.timer = Timer(torch, device, cpu_time=args.cpu_time)
        self.builder = self.instruction = self.model = self.decoder = None
        self.batches, self.mixed = {}, None

    # -- bookkeeping ---------------------------------------------------------------------

    def save(self):
        if self.args.out is not None:
            self.args.out.parent.mkdir(parents=True, exist_ok=True)
            self.args.out.write_text(json.dumps(self.results, indent=2) + '\n')

    def error(self, what, error):
        self.results['errors'].append(f'{what}: {type(error).__name__}: {error}')
        print(self.results['errors'][-1], flush=True)

    def add_run(self, run, save=True):
        self.results['runs'].append(run)
        print(row_text(run), flush=True)
        if save:
            self.save()

    def new_decoder(self, fuse=None, nf4_kernel=None):
        """A decoder with the command line's choices, unless told otherwise."""
        return FastGreedyDecoder(fuse_elementwise=self.fuse if fuse is None else fuse,
                                 nf4_kernel=self.nf4_kernel if nf4_kernel is None else nf4_kernel)

    # -- setting up ----------------------------------------------------------------------

    def build_inputs(self, workdir: Path):
        """The node's prompt on test images: batch 1 (timed), every ``--batch-sizes`` batch
        and the mixed-size batch of the agreement check, on the device."""
        self.builder = make_input_builder(self.args, workdir)
        self.instruction = PromptBuilder(ARTICLE_CATEGORIES, describe=True).instruction
        started = time.perf_counter()
        one = self.builder.build([test_image(self.width, self.height, 0)], self.instruction)
        self.results['input_build_ms_batch1'] = 1000 * (time.perf_counter() - started)
        self.results['prompt_tokens'] = one.prompt_length
        self.results['visual_tokens'] = int(
            (one.tensors['input_ids'] == self.builder.image_token_id).sum())
        self.results['instruction'] = self.instruction
        for size in sorted(set(self.args.batch_sizes) | {1}):
            self.batch_inputs(size)
        small = (max(32, self.width * 3 // 4 // 32 * 32),
                 max(32, self.height * 3 // 4 // 32 * 32))
        images = [test_image(self.width, self.height, 10), test_image(*small, 11),
                  test_image(self.width, self.height, 12)]
        self.mixed = self.builder.build(images, self.instruction).to(self.device).tensors

    def batch_inputs(self, batch):
        """The device tensors of ``batch`` test images (seeds 0 to batch - 1), built once."""
        if batch not in self.batches:
            images = [test_image(self.width, self.height, seed) for seed in range(batch)]
            self.batches[batch] = self.builder.build(images, self.instruction).to(
                self.device).tensors
        return self.batches[batch]

    def build_model(self, transformers):
        self.results['clock'] = 'process CPU time, 1 thread' if self.args.cpu_time else 'wall'
        self.timer.reset_peak()
        self.model = build_model(self.torch, transformers, self.args, self.device, self.dtype)
        self.results['parameters'] = sum(p.numel() for p in self.model.parameters())
        self.results['model_gb'] = {self.dtype_name: self.timer.allocated_gb()}
        self.decoder = self.new_decoder()

    # -- the checks, each recorded in results ---------------------------------------------

    def our_runs(self, label):
        """Our engine at every ``--batch-sizes`` x ``--new-tokens``."""
        for batch in self.args.batch_sizes:
            for new_tokens in self.args.new_tokens:
                try:
                    run = time_ours(self.torch, self.timer, self.decoder, self.model,
                                    self.batches[batch], batch, new_tokens, self.args.repeats,
                                    label)
                except Exception as error:  # record and go on: partial results count
                    self.error(f'ours {label} b{batch} n{new_tokens}', error)
                    continue
                self.add_run(run)
            self.decoder.clear()  # peak memory per batch size, not all sizes' caches at once

    def check_agreement(self, label):
        if self.args.agreement_tokens <= 0:
            return
        decoders = {'default': self.decoder}
        if self.on_cuda and self.fuse is not False:
            decoders['unfused'] = self.new_decoder(fuse=False)
        try:
            entry = agreement(self.model, decoders, self.mixed, self.args.agreement_tokens,
                              label)
        except Exception as error:
            self.error(f'agreement {label}', error)
            return
        self.results['agreement'].append(entry)
        for name in decoders:
            print(f"agreement {label} ({name}): per token (teacher forced) "
                  f"{entry[name]['per_token']:.1%}, sequences identical "
                  f"{entry[name]['sequences_identical']:.0%}, tokens before first "
                  f"difference {entry[name]['tokens_before_first_difference']:.0%}",
                  flush=True)
        self.save()

    def profile(self, label):
        if not (self.args.profile and self.on_cuda):
            return
        name = 'profile_' + ''.join(c if c.isalnum() else '_' for c in label)[:40] + '.txt'
        path = (self.args.out.parent if self.args.out else Path('.')) / name
        try:
            self.results['profile_ms_per_step'][label] = profile_step(
                self.torch, self.decoder, self.model, self.batches[1], path)
        except Exception as error:
            self.results['errors'].append(f'profile {label}: {type(error).__name__}: {error}')
        print(f"profile {label}: {self.results['profile_ms_per_step'].get(label)} ms of "
              'kernels per step', flush=True)

    def memory_check(self, where):
        """What stays allocated once the decoder has dropped its sessions."""
        self.decoder.clear()
        self.timer.reset_peak()
        self.results['allocated_gb'][where] = self.timer.allocated_gb()

    def unfused_check(self, label):
        if not self.args.unfused_check:
            return
        plain = self.new_decoder(fuse=False)
        self.add_run(time_ours(self.torch, self.timer, plain, self.model, self.batches[1], 1,
                               self.args.new_tokens[0], self.args.repeats, label + ' unfused'),
                     save=False)
        plain.clear()
        self.save()

    def bnb_check(self, label):
        if not self.args.bnb_check:
            return
        plain = self.new_decoder(nf4_kernel=False)
        for spec in self.args.bnb_check:
            batch, new_tokens = parse_pair(spec)
            run = time_ours(self.torch, self.timer, plain, self.model, self.batch_inputs(batch),
                            batch, new_tokens, self.args.repeats,
                            label + ', bitsandbytes decode linears')
            plain.clear()
            self.add_run(run)

    def linear_check(self):
        if not (self.args.linear_rows and self.on_cuda):
            return
        try:
            self.results['decode_linears'] = linear_step(self.torch, self.model,
                                                         self.args.linear_rows, self.dtype)
        except Exception as error:
            self.error('linears', error)
        self.save()

    def lm_head_check(self):
        if not (self.args.lm_head_check and self.on_cuda):
            return
        try:
            self.results['lm_head'] = lm_head_check(self.torch, self.model, self.mixed,
                                                    self.args.linear_rows or [1, 8])
        except Exception as error:
            self.error('lm_head', error)
        self.save()

    def prefix_check(self):
        self.results['instruction_prefill'] = instruction_prefill(
            self.torch, self.timer, self.model, self.batches[1], self.args.repeats)
        print(f"instruction prefix alone: {self.results['instruction_prefill']}", flush=True)
        self.save()

    def article_runs(self, label):
        """Our engine, then ``model.generate``, at every ``--article-runs`` configuration."""
        for spec in self.args.article_runs:
            batch, new_tokens = parse_pair(spec)
            tensors = self.batch_inputs(batch)
            run = time_ours(self.torch, self.timer, self.decoder, self.model, tensors, batch,
                            new_tokens, self.args.repeats, label)
            self.decoder.clear()
            self.add_run(run, save=False)
            self.add_run(time_generate(self.torch, self.timer, self.model, tensors, batch,
                                       new_tokens, self.args.article_repeats, label))

    # -- the phases: one model, quantized further in each -----------------------------------

    def quantize(self, skip, model_gb_key):
        """Quantize the model's remaining linears outside ``skip`` in place; record its size."""
        count = quantize_linears(self.torch, self.model, self.dtype, skip=skip)
        self.timer.reset_peak()
        self.results['model_gb'][model_gb_key] = self.timer.allocated_gb()
        self.results['nf4_layers'] = self.results.get('nf4_layers', 0) + count

    def run_unquantized(self):
        label = self.dtype_name
        self.check_agreement(label)
        self.our_runs(label)
        self.unfused_check(label)
        self.profile(label)
        self.memory_check(f'after {label} runs')

    def run_nf4(self):
        """The language model NF4, vision tower unquantized (the node's on-load quantization)."""
        label = f'nf4, {self.dtype_name} compute, vision {self.dtype_name}'
        self.check_agreement(label)
        self.our_runs(label)
        self.unfused_check(label)
        self.bnb_check(label)
        self.linear_check()
        self.lm_head_check()
        self.prefix_check()
        self.profile(label)
        self.memory_check(f'after {label} runs')

    def run_nf4_all(self):
        self.our_runs(f'nf4 all, {self.dtype_name} compute')

    def run_article(self):
        """nf4-all with the article's float16 compute (float32 on the CPU)."""
        compute = self.torch.float16 if self.on_cuda else self.torch.float32
        set_compute_dtype(self.model, compute)
        label = f'article model (nf4 all, {dtype_name(compute)} compute)'
        self.check_agreement(label)
        self.article_runs(label)

    def run_variants(self):
        variants = set(self.args.variants)
        if 'bf16' in variants:
            self.run_unquantized()
        if variants & {'nf4', 'nf4-all', 'article'}:
            self.quantize(('lm_head', 'visual'), 'nf4 (vision unquantized)')
            if 'nf4' in variants:
                self.run_nf4()
        if variants & {'nf4-all', 'article'}:
            self.decoder.clear()
            self.quantize(('lm_head',), 'nf4 (all but lm_head)')
            if 'nf4-all' in variants:
                self.run_nf4_all()
            if 'article' in variants:
                self.run_article()


def pick_device(torch, args):
    """The device to run on; with ``--cpu-time``, one torch thread (CPU only)."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.cpu_time:
        if device.type == 'cuda':
            raise SystemExit('--cpu-time is for --device cpu')
        torch.set_num_threads(1)
    return device


def new_results(args, torch, device):
    return {'command': ' '.join(sys.argv), 'environment': environment(torch, device),
            'architecture': 'tiny' if args.tiny else ('checkpoint' if args.model
                                                      else 'Qwen3-VL-4B (random weights)'),
            'image': 'x'.join(str(value) for value in parse_pair(args.image)), 'runs': [],
            'agreement': [], 'errors': [], 'allocated_gb': {}, 'profile_ms_per_step': {}}


def main(argv=None):
    args = parse_args(argv)
    if args.model is not None:
        args.model = resolve_model_path(str(args.model), 'none')
    if args.server:
        return served_benchmark(args)
    if args.memory_only:
        return memory_only(args)
    torch = require_torch()
    transformers = require('transformers', 'to build Qwen3-VL')
    device = pick_device(torch, args)
    bench = Benchmark(args, torch, device, new_results(args, torch, device))
    if args.memory_processes and bench.on_cuda:  # first, while this process holds no GPU memory
        bench.results['memory_processes'] = memory_processes(
            args, [variant for variant in ('nf4', 'nf4-all') if variant in args.variants])
        bench.save()
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        bench.build_inputs(Path(workdir))
        bench.build_model(transformers)
        if args.linears_only:
            bench.quantize(('lm_head', 'visual'), 'nf4 (vision unquantized)')
            bench.linear_check()
            bench.lm_head_check()
        else:
            bench.run_variants()
    bench.save()
    print()
    print(table(bench.results))
    return bench.results


# -- a served model (--server) -----------------------------------------------------------------

def served_images(args):
    """``--frames`` images: the first of ``--images`` (natural order), else synthetic scenes."""
    if args.images is not None:
        from qwen_vl_perception.image_conversion import load_image_file
        from qwen_vl_perception.data.image_folder import list_images
        paths = list_images(args.images)[:args.frames]
        if not paths:
            raise SystemExit(f'error: no images in {args.images}')
        return [load_image_file(path) for path in paths], f'{len(paths)} of {args.images}'
    from qwen_vl_perception.data.scenes import generate_scene
    width, height = parse_pair(args.image)
    return ([generate_scene(50_000 + index, width, height)[0] for index in range(args.frames)],
            f'{args.frames} synthetic scenes {width}x{height} (seeds 50000+)')


def served_instruction(args) -> str:
    from qwen_vl_perception.detector import DetectionSettings, prepare_settings
    from qwen_vl_perception.trained_prompt import read_prompt_file
    record = read_prompt_file(args.model) if args.model is not None else None
    if record is None:
        settings = DetectionSettings(categories=tuple(ARTICLE_CATEGORIES))
    else:
        settings = DetectionSettings(categories=tuple(record['categories']),
                                     describe=bool(record.get('describe', False)),
                                     attributes=tuple(record.get('attributes') or ()),
                                     prompt_template=record.get('prompt_template'))
    return prepare_settings(settings).instruction


def served_benchmark(args):
    """The served model at each ``--in-flight``, the local engine at each ``--batch-sizes``."""
    from qwen_vl_perception.backends.http_client import ServerError
    from qwen_vl_perception.backends.openai_engine import OpenAIEngine
    from qwen_vl_perception.backends.throughput import time_local, time_served
    if args.model is None and not args.no_local:
        raise SystemExit('error: --server times the local engine on --model beside it '
                         '(or pass --no-local)')
    images, described = served_images(args)
    instruction = served_instruction(args)
    engine = OpenAIEngine.for_model(args.server, args.model, model=args.server_model,
                                    api_key_env=args.server_api_key_env,
                                    timeout_s=args.server_timeout,
                                    max_in_flight=max(args.in_flight))
    try:
        served = engine.connect()
    except ServerError as error:
        raise SystemExit(f'error: {error}') from None
    results = {'command': ' '.join(sys.argv), 'mode': 'served', 'server': engine.server_url,
               'served_models': served, 'server_model': engine.model_name,
               'model': str(args.model) if args.model else None, 'images': described,
               'pixel_budget': [engine.min_pixels, engine.max_pixels],
               'max_new_tokens': args.max_new_tokens, 'instruction': instruction,
               'environment': {'python': platform.python_version(),
                               'machine': platform.machine()},
               'runs': [], 'agreement': None}
    print(f'{engine.description}; {described}; instruction: {instruction}', flush=True)
    texts = {}
    try:
        engine.answer(images[0], instruction, args.max_new_tokens)  # warm-up, not timed
        for in_flight in args.in_flight:
            figures, texts[('openai', in_flight)] = time_served(
                engine, images, instruction, args.max_new_tokens, in_flight)
            results['runs'].append(figures.to_dict())
            print(served_row(figures), flush=True)
    except ServerError as error:
        raise SystemExit(f'error: a request failed, no figure for this run: {error}') from None
    finally:
        engine.close()
    if not args.no_local:
        from qwen_vl_perception.model.engine import VisionLanguageEngine
        local = VisionLanguageEngine(args.model, device=args.device or 'auto')
        results['environment']['local_device'] = str(local.device)
        try:
            local.generate(images[:1], instruction, args.max_new_tokens)  # warm-up
            for batch in args.batch_sizes:
                figures, texts[('local', batch)] = time_local(
                    local, images, instruction, args.max_new_tokens, batch)
                results['runs'].append(figures.to_dict())
                print(served_row(figures), flush=True)
        finally:
            local.close()
        first_served = texts[('openai', args.in_flight[0])]
        first_local = texts[('local', args.batch_sizes[0])]
        results['agreement'] = sum(a == b for a, b in zip(first_served, first_local)) / len(images)
        print(f'identical answers, served ({args.in_flight[0]} in flight) and local (batch '
              f'{args.batch_sizes[0]}): {results["agreement"]:.0%} of {len(images)}')
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + '\n')
    print()
    print(served_table(results))
    return results


def served_row(figures) -> str:
    what = ('served, in flight' if figures.backend == 'openai' else 'local, batch')
    return (f'{what:18} {figures.concurrency:2}: {figures.frames_per_s:6.2f} frames/s, latency '
            f'mean {figures.latency_ms_mean:7.0f} ms, p50 {figures.latency_ms_p50:7.0f} ms, '
            f'max {figures.latency_ms_max:7.0f} ms, {figures.tokens_mean:.0f} tokens/answer')


def served_table(results) -> str:
    lines = ['| engine | in flight / batch | frames/s | latency mean ms | p50 ms | max ms | '
             'tokens/answer |', '|---|---|---|---|---|---|---|']
    for run in results['runs']:
        engine = 'served (openai backend)' if run['backend'] == 'openai' else 'local engine'
        lines.append(f"| {engine} | {run['concurrency']} | {run['frames_per_s']:.2f} | "
                     f"{run['latency_ms_mean']:.0f} | {run['latency_ms_p50']:.0f} | "
                     f"{run['latency_ms_max']:.0f} | {run['tokens_mean']:.0f} |")
    return '\n'.join(lines)


def environment(torch, device):
    info = {'python': platform.python_version(), 'torch': torch.__version__,
            'transformers': require('transformers', '').__version__, 'device': str(device)}
    try:
        info['bitsandbytes'] = require('bitsandbytes', '').__version__
    except ImportError:
        info['bitsandbytes'] = None
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
    else:
        info['cpu'] = platform.processor() or platform.machine()
        info['threads'] = torch.get_num_threads()
    return info


def row_text(run):
    peak = f"{run['peak_gb']:.2f}" if run.get('peak_gb') is not None else '-'
    return (f"{run['engine']:8} {run['label'][:44]:44} b{run['batch']:<2} n{run['new_tokens']:<4}"
            f" prefill {run['prefill_ms']:8.1f} ms  decode {run['decode_ms_per_token']:7.2f}"
            f" ms/tok  frame {run['frame_s']:7.3f} s  {run['frames_per_s']:7.2f} frames/s"
            f"  peak {peak} GB")


def table(results):
    header = ('| engine | weights | batch | tokens | prefill ms | decode ms/token | frame s '
              '| frames/s | peak GB |\n|---|---|---|---|---|---|---|---|---|')
    lines = [header]
    for run in results['runs']:
        peak = f"{run['peak_gb']:.2f}" if run.get('peak_gb') is not None else '-'
        engine = 'model.generate' if run['engine'] == 'generate' else 'FastGreedyDecoder'
        lines.append(f"| {engine} | {run['label']} | {run['batch']} | {run['new_tokens']} | "
                     f"{run['prefill_ms']:.1f} | {run['decode_ms_per_token']:.2f} | "
                     f"{run['frame_s']:.3f} | {run['frames_per_s']:.2f} | {peak} |")
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
