"""Peak device memory of a quantized variant, each measured in a fresh process."""
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from qwen_vl_perception.model.fast_decode import FastGreedyDecoder
from qwen_vl_perception.model.torch_support import require, require_torch

from .arguments import TRISTATE, parse_pair
from .inputs import article_instruction, make_input_builder, test_image
from .models import SKIPPED, build_model, quantize_linears
from .timing import GB


def memory_only(args):
    """One fresh process, one quantized variant (``--memory-only``): resident weights, then the
    peak of a first batch-1 frame (tuning, capture) and of a steady one. Prints one JSON
    line."""
    torch = require_torch()
    transformers = require('transformers', 'to build Qwen3-VL')
    device, dtype = torch.device('cuda'), torch.bfloat16
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        builder = make_input_builder(args, Path(workdir))
        width, height = parse_pair(args.image)
        tensors = builder.build([test_image(width, height, 0)], article_instruction()).to(
            device).tensors
        model = build_model(torch, transformers, args, device, dtype)
        quantize_linears(torch, model, dtype, skip=SKIPPED[args.memory_only])
        result = frame_peaks(torch, device, model, tensors, args)
    print(json.dumps(result), flush=True)
    return result


def frame_peaks(torch, device, model, tensors, args):
    """The weights' allocation, then the peaks of a first and a steady batch-1 frame."""
    new_tokens = args.new_tokens[0]
    gc.collect()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    decoder = FastGreedyDecoder(fuse_elementwise=TRISTATE[args.fuse],
                                nf4_kernel=TRISTATE[args.nf4_kernel],
                                overlap_launches=TRISTATE[args.overlap],
                                fold_elementwise=TRISTATE[args.fold],
                                fold_act_out=TRISTATE[args.fold_act_out],
                                fuse_prefill=TRISTATE[args.fuse_prefill])
    decoder(model, tensors, new_tokens, [])
    first = torch.cuda.max_memory_allocated(device)
    first_reserved = torch.cuda.max_memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    decoder(model, tensors, new_tokens, [])
    steady = torch.cuda.max_memory_allocated(device)
    return {'variant': args.memory_only, 'batch': 1, 'new_tokens': new_tokens,
            'weights_gb': weights / GB, 'first_frame_peak_gb': first / GB,
            'first_frame_peak_reserved_gb': first_reserved / GB,
            'steady_frame_peak_gb': steady / GB,
            'steady_frame_peak_reserved_gb': torch.cuda.max_memory_reserved(device) / GB,
            'nf4_kernel_layers': decoder.last_session_nf4_layers}


def memory_processes(args, variants, script: Path):
    """Run ``script --memory-only`` (:func:`memory_only`) in a fresh process per variant;
    their JSON results, or the variant's error."""
    results = []
    for variant in variants:
        done = subprocess.run(memory_command(args, variant, script), capture_output=True,
                              text=True, timeout=1200)
        lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
        if done.returncode != 0 or not lines:
            results.append({'variant': variant, 'error': done.stderr[-2000:]})
        else:
            results.append(json.loads(lines[-1]))
        print(f'memory, fresh process, {variant}: {results[-1]}', flush=True)
    return results


def memory_command(args, variant, script: Path):
    """The command line of one ``--memory-only`` process, with this run's model and choices."""
    command = [sys.executable, str(script), '--memory-only', variant,
               '--image', args.image, '--new-tokens', str(args.new_tokens[0]),
               '--nf4-kernel', args.nf4_kernel, '--fuse', args.fuse, '--overlap', args.overlap,
               '--fold', args.fold, '--fold-act-out', args.fold_act_out,
               '--fuse-prefill', args.fuse_prefill]
    if args.tiny:
        command.append('--tiny')
    if args.model is not None:
        command += ['--model', str(args.model)]
    return command
