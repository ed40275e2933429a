"""Run the NF4 decode kernel in Triton's CPU interpreter against bitsandbytes' dequantization.

Started by ``test_nf4_matmul.py`` in its own process (``TRITON_INTERPRET`` must be set before
Triton is imported). Every launch shape the tuner may pick (rows per program, split or not),
nested and plain absmax, single weights and groups of two and three. The interpreter cannot
run inline PTX, so the table lookup is its gather form here (the CUDA tests run the PTX one).
float16 only: the interpreter's ``tl.dot`` mishandles bfloat16. Then the prefill path's
dequantization in bfloat16 and float16. Prints one line per check and exits non-zero on the
first mismatch.
"""
import os
import sys

os.environ['TRITON_INTERPRET'] = '1'

import bitsandbytes.functional as bnb_functional  # noqa: E402
import torch  # noqa: E402

from qwen_vl_perception.model.nf4_matmul import NF4Matmul, NF4Weight  # noqa: E402

CASES = [  # out features, in features, rows; 72 x 512: the last row tile is partly padding
    (96, 256, 3), (64, 512, 1), (40, 128, 16), (72, 64, 5), (72, 512, 2)]
GROUPS = [((64, 32, 96), 256, 4), ((40, 72), 192, 1)]


def weight_view(packed, state, nested, bias, dtype):
    if nested:
        absmax2, code2 = state.state2.absmax, state.state2.code
        nested_block, offset = state.state2.blocksize, float(state.offset)
    else:
        absmax2 = code2 = state.absmax
        nested_block, offset = 1, 0.0
    out_features, in_features = state.shape
    return NF4Weight(packed.view(-1), state.absmax, absmax2, code2, state.code.float(), offset,
                     nested, nested_block, out_features, in_features, bias, dtype)


def quantized(out_features, in_features, nested, dtype, bias=True):
    weight = torch.randn(out_features, in_features)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type='nf4')
    dequantized = bnb_functional.dequantize_4bit(packed, state).to(dtype).float()
    bias = torch.randn(out_features).to(dtype) if bias else None
    return weight_view(packed, state, nested, bias, dtype), dequantized


def compare(name, outs, expected, rows):
    for out, reference in zip(outs, expected):
        if out.shape != (rows, 1, reference.shape[-1]):
            print(f'{name}: shape {tuple(out.shape)}', file=sys.stderr)
            return False
        error = (out[:, 0].float() - reference).abs().max().item()
        limit = 2e-3 * reference.abs().max().item()
        line = f'{name}: max error {error:.4g} (limit {limit:.4g})'
        print(line)
        if not error <= limit:
            print('MISMATCH', file=sys.stderr)
            return False
    return True


def main():
    torch.manual_seed(0)
    dtype = torch.float16
    checked = 0
    for nested in (True, False):
        for out_features, in_features, rows in CASES:
            view, dequantized = quantized(out_features, in_features, nested, dtype)
            x = torch.randn(rows, 1, in_features).to(dtype)
            expected = x[:, 0].float() @ dequantized.T + view.bias.float()
            matmul = NF4Matmul(tune=False)
            for shape in matmul.candidates(out_features, in_features, 4):
                out = matmul(x, view, shape)
                if not compare(f'nested={nested} {out_features}x{in_features} rows={rows} '
                               f'{shape}', [out], [expected], rows):
                    return 1
                checked += 1
        for widths, in_features, rows in GROUPS:
            made = [quantized(width, in_features, nested, dtype, bias=False) for width in widths]
            x = torch.randn(rows, 1, in_features).to(dtype)
            expected = [x[:, 0].float() @ dequantized.T for _, dequantized in made]
            matmul = NF4Matmul(tune=False)
            for shape in matmul.candidates(widths, in_features, 4):
                outs = matmul.grouped(x, [view for view, _ in made], shape)
                if not compare(f'nested={nested} group {widths}x{in_features} rows={rows} '
                               f'{shape}', outs, expected, rows):
                    return 1
                checked += 1
    for dtype in (torch.bfloat16, torch.float16):  # the prefill path's dequantization
        for nested in (True, False):
            weight = torch.randn(80, 192)
            packed, state = bnb_functional.quantize_4bit(
                weight, blocksize=64, compress_statistics=nested, quant_type='nf4')
            expected = bnb_functional.dequantize_4bit(packed, state).to(dtype)
            view = weight_view(packed, state, nested, None, dtype)
            out = NF4Matmul(tune=False).dequantize(view)
            exact = (out == expected).float().mean().item()
            ulps = ((out.float() - expected.float()).abs()
                    / expected.float().abs().clamp_min(1e-6)).max().item()
            print(f'dequantize {dtype} nested={nested}: {exact:.4%} exact, max relative '
                  f'difference {ulps:.2e}')
            # The interpreter truncates float32 to bfloat16 (CUDA rounds to nearest: the CUDA
            # test wants exact values there), so bfloat16 is held to one unit in the last place.
            if ulps > 2 ** -7 or (dtype == torch.float16 and exact < 0.999):
                print('MISMATCH', file=sys.stderr)
                return 1
    print(f'{checked} launches match')
    return 0


if __name__ == '__main__':
    sys.exit(main())
