#!/usr/bin/env python3
"""Quantize a merged Qwen3-VL checkpoint to a saved bitsandbytes 4-bit checkpoint.

Defaults are the article's: NF4, double quantization, float16 compute. lm_head always stays
in full precision (tied to the embeddings); --keep-full-precision keeps more (``visual``: the
vision tower). The result gets the source's tokenizer, processor files and chat template, is
reloaded through the node's engine (its Linear4bit layers counted) and answers one probe
image. Works on CUDA and on the CPU (bitsandbytes' CPU NF4); prints sizes before and after.
"""
import argparse
import sys
import warnings

from qwen_vl_perception.model.default_model import (FLOAT32_DEFAULT_HELP, DefaultModelError,
                                                    resolve_model_path)
from qwen_vl_perception.model.loading import ModelLoadError, read_checkpoint_config
from qwen_vl_perception.pipeline.quantization import (COMPUTE_DTYPES, QUANT_TYPES, QUANTIZE_LOG,
                                                      STORAGE_DTYPES, QuantizeCheckError,
                                                      QuantizeError, quantize_checkpoint)
from qwen_vl_perception.model.torch_support import MissingDependencyError
from qwen_vl_perception.tool_support import (MODEL_WEIGHT_PATTERNS, ToolError, format_bytes,
                                             prepare_output_dir, run_tool, split_names)

EXAMPLE = """example (the article's step 3, on the merged Qwen3-VL-4B-Instruct):
  python tools/quantize.py --model models/qwen3-vl-4b-merged --out models/qwen3-vl-4b-nf4
  keep the vision tower in bf16 (+0.6 GB, usually better boxes):
  python tools/quantize.py --model models/qwen3-vl-4b-merged --out models/qwen3-vl-4b-nf4-v \\
      --keep-full-precision visual
then run it: python tools/detect_folder.py --model models/qwen3-vl-4b-nf4 --images ... --out ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True,
                        help='merged (unquantized) checkpoint folder, or '
                             + FLOAT32_DEFAULT_HELP)
    parser.add_argument('--out', required=True, help='folder for the 4-bit checkpoint')
    parser.add_argument('--quant-type', default='nf4', choices=QUANT_TYPES,
                        help='4-bit data type (default %(default)s)')
    parser.add_argument('--compute-dtype', default='float16', choices=COMPUTE_DTYPES,
                        help='dtype of the 4-bit matmuls (default %(default)s, the article\'s)')
    parser.add_argument('--no-double-quant', action='store_true',
                        help='do not quantize the quantization constants (default: do)')
    parser.add_argument('--keep-full-precision', nargs='+', default=[], metavar='MODULE',
                        help='modules left unquantized, e.g. visual, visual.merger '
                             '(lm_head always is)')
    parser.add_argument('--dtype', default='auto', choices=STORAGE_DTYPES,
                        help="dtype of the unquantized modules (default: the checkpoint's)")
    parser.add_argument('--device', default='auto',
                        help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--check-image', default=None,
                        help='image for the generation check (default: a synthetic scene)')
    parser.add_argument('--check-tokens', type=int, default=64,
                        help='new tokens of the generation check (default %(default)s)')
    parser.add_argument('--overwrite', action='store_true',
                        help='allow writing into a non-empty --out folder (old weight files '
                             'there are deleted first)')
    return parser


def main(argv=None) -> int:
    return run_tool(run, build_parser().parse_args(argv),
                    expected=(ModelLoadError, QuantizeError, MissingDependencyError,
                              DefaultModelError, ValueError),
                    check_failures=(QuantizeCheckError,))


def run(args) -> int:
    args.model = resolve_model_path(args.model, 'none')
    read_checkpoint_config(args.model)
    if args.check_tokens < 1:
        raise ToolError('--check-tokens must be at least 1')
    out = prepare_output_dir(args.out, args.overwrite, inputs=[args.model],
                             stale_patterns=MODEL_WEIGHT_PATTERNS + (QUANTIZE_LOG,))
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*is_gradient_checkpointing.*')
        result = quantize_checkpoint(
            args.model, out, quant_type=args.quant_type, compute_dtype=args.compute_dtype,
            double_quant=not args.no_double_quant,
            keep_full_precision=split_names(args.keep_full_precision), device=args.device,
            storage_dtype=args.dtype, check_image=args.check_image,
            max_new_tokens=args.check_tokens)
    print(f'{result.linear4bit_layers} Linear4bit layers, {result.full_precision_linear_layers} '
          f'full-precision linear layers (in {", ".join(result.full_precision_modules)})')
    print(f'check answer ({result.check_new_tokens} tokens): {result.check_answer!r}')
    ratio = result.quantized_weight_bytes / max(result.source_weight_bytes, 1)
    print(f'size: {format_bytes(result.source_weight_bytes)} -> '
          f'{format_bytes(result.quantized_weight_bytes)} on disk ({ratio:.0%}); '
          f'{format_bytes(result.memory_footprint_bytes)} in memory')
    print(f'wrote the 4-bit checkpoint to {out} in {result.seconds:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
