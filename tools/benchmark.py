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
from pathlib import Path

from qwen_vl_perception.model.default_model import resolve_model_path

from benchmarking.arguments import parse_args  # tools/benchmarking, beside this script
from benchmarking.local import local_benchmark
from benchmarking.memory import memory_only
from benchmarking.served import served_benchmark

SCRIPT = Path(__file__).resolve()
"""This tool: ``--memory-processes`` runs it again in fresh processes."""


def main(argv=None):
    """Run the benchmark the arguments ask for; its results (also written to ``--out``)."""
    args = parse_args(argv, __doc__)
    if args.model is not None:
        args.model = resolve_model_path(str(args.model), 'none')
    if args.server:
        return served_benchmark(args)
    if args.memory_only:
        return memory_only(args)
    return local_benchmark(args, SCRIPT)


if __name__ == '__main__':
    main()
