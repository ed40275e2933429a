"""The NF4 decode matmul: its PTX lookup run by a small PTX interpreter, the kernel in
Triton's CPU interpreter here, the real kernel where a GPU is."""
import dataclasses

import pytest

from triton_support import (TRITON_MISSING as triton_missing, interpreter_cannot_loop,
                            run_interpreter_check)

torch = pytest.importorskip('torch')
bnb = pytest.importorskip('bitsandbytes')

from qwen_vl_perception.model.fast_decode import FastGreedyDecoder  # noqa: E402
from qwen_vl_perception.model.nf4_matmul import (  # noqa: E402
    MAX_ROWS, NF4_TABLE, LaunchShape, NF4Matmul, NF4Weight, asm_constraints,
    kernel_unavailable_reason, lookup_asm, nf4_weight)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def nf4_linear(out_features, in_features, compute_dtype, nested=True, bias=True,
               device='cuda', seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    module = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                               compress_statistics=nested, quant_type='nf4', device='meta')
    module.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                      compress_statistics=nested, quant_type='nf4',
                                      module=module).to(device)
    if bias:
        module.bias = torch.nn.Parameter(linear.bias.data.to(device, compute_dtype),
                                         requires_grad=False)
    return module


def dequantized_reference(module, x):
    """fp32 product with the weight bitsandbytes' dequantization gives in compute dtype."""
    weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    weight = weight.to(module.compute_dtype).float()
    out = x.to(module.compute_dtype).float() @ weight.T
    if module.bias is not None:
        out = out + module.bias.float()
    return out


@pytest.mark.skipif(triton_missing, reason='needs Triton (its CPU interpreter)')
@pytest.mark.skipif(interpreter_cannot_loop(),
                    reason="this Triton's interpreter cannot loop with numpy >= 2.3")
def test_kernel_matches_bitsandbytes_dequantization_in_the_interpreter():
    """Every launch shape the tuner may pick, nested and plain absmax, 1-16 rows."""
    output = run_interpreter_check('nf4_interpreter_check.py')
    checked = int(output.strip().splitlines()[-1].split()[0])
    assert checked >= 100, output[-3000:]
    assert 'group (64, 32, 96)' in output and 'splits=4' in output


def test_launch_shapes_split_the_reduction_into_non_empty_parts():
    for widths, in_features in [(4096, 2560), (2560, 9728), (1024, 2560), (72, 64),
                                ((4096, 1024, 1024), 2560), ((9728, 9728), 2560)]:
        shapes = NF4Matmul.candidates(widths, in_features, 132, cuda=True)
        assert shapes and len(set(shapes)) == len(shapes)
        assert shapes[:len(NF4Matmul.candidates(widths, in_features, 132))] == \
            NF4Matmul.candidates(widths, in_features, 132)  # the Triton ones first
        blocks = in_features // 64
        for shape in shapes:
            per_split = -(-blocks // shape.splits)
            assert 1 <= shape.splits <= max(1, blocks // 2)
            assert (shape.splits - 1) * per_split < blocks  # the last split has work
            if shape.kernel == 'cuda':  # every warp of a split has a block
                assert per_split >= shape.num_warps and shape.block_n % 16 == 0
        sizes = [widths] if isinstance(widths, int) else widths
        assert any(shape.kernel == 'cuda' for shape in shapes) == all(
            size % 16 == 0 for size in sizes)
    # 2560 x 9728: 20 tiles of 128 rows; 132 programs want 7 splits of 22 blocks each.
    default = NF4Matmul.candidates(2560, 9728, 132)[0]
    assert (default.block_n, default.splits, default.num_warps) == (128, 7, 4)


def test_cuda_table_variants_compile_only_within_shared_memory():
    from qwen_vl_perception.model import nf4_cuda, nf4_matmul
    assert nf4_cuda.fits(nf4_cuda.CudaShape(4, 1, 4, 16))
    assert not nf4_cuda.fits(nf4_cuda.CudaShape(4, 1, 4, 3))  # copies: a power of two
    assert not nf4_cuda.fits(nf4_cuda.CudaShape(16, 2, 4, 16))  # partial sums + table > 48 KB
    source = nf4_cuda.source_for(NF4_TABLE, True, True, nf4_cuda.CudaShape(4, 1, 4, 8), 1)
    assert '#define TABLE 8\n' in source and '#define TABLE_SHIFT 5\n' in source
    plain = nf4_cuda.source_for(NF4_TABLE, True, True, nf4_cuda.CudaShape(), 1)
    assert '#define TABLE 0\n' in plain
    with pytest.raises(ValueError, match='does not compile'):
        nf4_cuda.source_for(NF4_TABLE, True, True, nf4_cuda.CudaShape(4, 1, 4, 64), 1)
    shapes = NF4Matmul.candidates([4096, 1024, 1024], 2560, 132, cuda=True)
    tables = {shape.table for shape in shapes if shape.kernel == 'cuda'}
    assert tables == set(nf4_matmul._CUDA_TABLES)
    assert all(shape.table == 0 for shape in shapes if shape.kernel == 'triton')
    assert all(nf4_cuda.fits(nf4_cuda.CudaShape(shape.num_warps, shape.block_n // 16,
                                                shape.num_stages, shape.table))
               for shape in shapes if shape.kernel == 'cuda')


def test_tiled_layout_puts_each_tiles_blocks_one_after_the_other():
    from qwen_vl_perception.model import nf4_cuda
    out_features, in_features = 48, 192  # 3 tiles of 16 rows, 3 blocks of 64
    row_bytes, blocks = in_features // 2, in_features // 64
    packed = torch.randint(0, 256, (out_features * row_bytes,), dtype=torch.uint8)
    absmax = torch.rand(out_features * blocks)
    tiled_packed, tiled_absmax = nf4_cuda.tiled(packed, absmax, out_features, in_features)
    assert tiled_packed.shape == packed.shape and tiled_absmax.shape == absmax.shape
    for row in range(out_features):
        tile, g = divmod(row, 16)
        for block in range(blocks):
            start = tile * 16 * row_bytes + block * 512 + g * 32  # where the kernel reads
            assert torch.equal(tiled_packed[start:start + 32],
                               packed[row * row_bytes + block * 32:][:32])
            assert tiled_absmax[tile * 16 * blocks + block * 16 + g] == absmax[row * blocks
                                                                               + block]
    weight = NF4Weight(packed=tiled_packed, absmax=tiled_absmax, absmax2=None, code2=None,
                       code=None, offset=0.0, nested=False, nested_block=1,
                       out_features=out_features, in_features=in_features, bias=None,
                       compute_dtype=torch.bfloat16, tiled=True)
    with pytest.raises(ValueError, match='tiled layout'):  # not bitsandbytes' layout
        NF4Matmul().dequantize(weight)


def test_rows_up_to_8_and_9_to_16_get_their_own_launch_shape():
    """The CUDA kernel takes 9-16 rows in two mma column tiles: a shape tuned at one row must
    not be reused there (each layer shape is tuned once per bucket)."""
    module = nf4_linear(64, 256, torch.bfloat16, device='cpu')
    weight = nf4_weight(module, require_cuda=False)
    matmul = NF4Matmul(tune=False)
    for rows in (1, 8, 12, 16, 3):
        matmul._shape(torch.zeros(rows, 256, dtype=torch.bfloat16), [weight])
    assert [entry['rows'] for entry in matmul.tuned_shapes()] == ['1-8', '9-16']


class _PTX:
    """Runs the few PTX instructions :func:`lookup_asm` emits (a check of the program, not of
    the GPU: the CUDA tests run it there)."""

    MASK = 0xFFFFFFFF

    def __init__(self, operands):
        self.registers = {f'${index}': value for index, value in enumerate(operands)}

    def value(self, token):
        token = token.strip()
        if token in self.registers:
            return self.registers[token]
        return int(token, 0)

    @staticmethod
    def prmt(a, b, selector):
        pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF
                                                            for i in range(4)]
        out = 0
        for position in range(4):
            nibble = (selector >> (4 * position)) & 0xF
            byte = pool[nibble & 7]
            if nibble & 8:  # sign-replicate mode
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << (8 * position)
        return out

    def run(self, program):
        for line in program.splitlines():
            line = line.strip().rstrip(';')
            if line in ('{', '}') or line.startswith('.reg'):
                continue
            opcode, rest = line.split(None, 1)
            target, *sources = [part.strip() for part in rest.split(',')]
            a, *more = [self.value(source) for source in sources]
            if opcode == 'and.b32':
                result = a & more[0]
            elif opcode == 'mul.hi.u32':
                result = (a * more[0]) >> 32
            elif opcode == 'mad.hi.u32':
                result = ((a * more[0]) >> 32) + more[1]
            elif opcode == 'lop3.b32':
                b, c, table = more
                result = 0
                for bit in range(32):
                    index = ((a >> bit & 1) << 2) | ((b >> bit & 1) << 1) | (c >> bit & 1)
                    result |= ((table >> index) & 1) << bit
            elif opcode == 'prmt.b32':
                result = self.prmt(a, *more)
            else:
                raise AssertionError(f'unexpected instruction {line}')
            self.registers[target] = result & self.MASK
        return self.registers


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('table', ['nf4', 'other'])
def test_lookup_asm_decodes_every_byte_to_its_two_table_values(dtype, table):
    values = NF4_TABLE if table == 'nf4' else [(-1) ** i * (i + 0.25) / 7 for i in range(16)]
    bits = torch.tensor(values).to(dtype).view(torch.int16).tolist()
    bits = [value & 0xFFFF for value in bits]
    program = lookup_asm(values, dtype)
    pack = 16
    assert asm_constraints(pack).count('=r') == pack and asm_constraints(pack).count(',r') == 4
    for first in range(0, 256, pack):  # every byte value once, 16 per program run
        packed = list(range(first, first + pack))
        words = [sum(packed[4 * w + i] << (8 * i) for i in range(4)) for w in range(4)]
        registers = _PTX([0] * pack + words).run(program)
        outputs = [registers[f'${index}'] for index in range(pack)]
        halves = [(register >> (16 * half)) & 0xFFFF for register in outputs for half in (0, 1)]
        even, odd = halves[:pack], halves[pack:]
        assert even == [bits[byte >> 4] for byte in packed]
        assert odd == [bits[byte & 15] for byte in packed]


def test_the_kernel_applies_only_to_nf4_weights_on_cuda():
    assert 'CUDA' in kernel_unavailable_reason('cpu')
    assert nf4_weight(torch.nn.Linear(128, 64)) is None
    assert nf4_weight(nf4_linear(64, 128, torch.bfloat16, device='cpu')) is None
    fp4 = bnb.nn.Linear4bit(128, 64, quant_type='fp4', device='meta')
    assert nf4_weight(fp4) is None


def test_only_plain_nf4_layers_qualify():
    """A PEFT LoRA layer around an NF4 one shows its base weight; the kernels would drop the
    adapter, so it must not qualify."""
    peft = pytest.importorskip('peft')
    plain = nf4_linear(64, 128, torch.bfloat16, device='cpu')
    assert nf4_weight(plain, require_cuda=False) is not None
    assert nf4_weight(plain) is None  # on the CPU

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nf4_linear(64, 128, torch.bfloat16, device='cpu')

    wrapped = peft.get_peft_model(Holder(), peft.LoraConfig(r=4, target_modules=['proj']))
    lora_layer = wrapped.base_model.model.proj
    assert getattr(lora_layer.weight, 'quant_state', None) is not None
    assert nf4_weight(lora_layer, require_cuda=False) is None


def test_bad_inputs_and_launch_shapes_are_refused_before_launching():
    weight = nf4_weight(nf4_linear(64, 128, torch.bfloat16, device='cpu'), require_cuda=False)
    matmul = NF4Matmul(tune=False)
    with pytest.raises(ValueError, match='features'):
        matmul.dequantized_linear(torch.randn(4, 96, dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match='features'):
        matmul(torch.randn(4, 96, dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match='too many'):  # 128 features = 2 blocks of 64
        matmul(torch.randn(4, 128, dtype=torch.bfloat16), weight, LaunchShape(64, 3))
    with pytest.raises(ValueError, match='at most'):
        matmul(torch.randn(MAX_ROWS + 1, 128, dtype=torch.bfloat16), weight)
    other = nf4_weight(nf4_linear(64, 128, torch.float16, device='cpu'), require_cuda=False)
    with pytest.raises(ValueError, match='share'):
        matmul.grouped(torch.randn(2, 128, dtype=torch.bfloat16), [weight, other])
    with pytest.raises(ValueError, match='1 to 3'):
        matmul.grouped(torch.randn(2, 128, dtype=torch.bfloat16), [weight] * 4)
    with pytest.raises(ValueError, match='min_rows'):
        NF4Matmul(min_rows=0)
    empty = matmul(torch.randn(0, 128, dtype=torch.bfloat16), weight)  # nothing launched
    assert empty.shape == (0, 64) and empty.dtype == torch.bfloat16
    odd = nf4_weight(nf4_linear(72, 128, torch.bfloat16, device='cpu'), require_cuda=False)
    with pytest.raises(ValueError, match='multiples of 16'):  # the CUDA kernel's tiles
        matmul(torch.randn(2, 128, dtype=torch.bfloat16), odd, LaunchShape(16, 1, 4, 4, 'cuda'))


def test_decoder_refuses_the_kernel_where_it_cannot_run():
    from decoding import STOPS, make_inputs, tiny_model
    with pytest.raises(ValueError, match='CUDA'):
        FastGreedyDecoder(nf4_kernel=True)(tiny_model(), make_inputs([(3, 2, None)]), 2, STOPS)


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('nested', [True, False])
@pytest.mark.parametrize('shape', [(200, 320), (1024, 2560)])
def test_cuda_kernel_matches_the_dequantized_product(compute_dtype, nested, shape):
    module = nf4_linear(*shape, compute_dtype, nested=nested)
    matmul = NF4Matmul()
    linear = matmul.linear_for(module)
    assert linear is not None
    for rows in (1, 3, 8, MAX_ROWS):
        x = torch.randn(rows, 1, shape[1], device='cuda', dtype=torch.bfloat16)
        expected = dequantized_reference(module, x)
        out = linear(x)
        assert out.shape == (rows, 1, shape[0]) and out.dtype == x.dtype
        scale = expected.abs().max().item()
        assert (out.float() - expected).abs().max().item() <= 1e-2 * scale
        # bitsandbytes' own result is as far from the reference as ours, or farther.
        theirs = (module(x).float() - expected).abs().max().item()
        assert (out.float() - expected).abs().max().item() <= max(theirs, 1e-3 * scale) * 2
    weight = nf4_weight(module)
    # every shape the tuner has, both kernels (the CUDA one takes widths in tiles of 16)
    choices = matmul.candidates(shape[0], shape[1], 132, cuda=True)
    assert any(choice.kernel == 'cuda' for choice in choices) == (shape[0] % 16 == 0)
    for shape_choice in choices:
        for rows in ((5,) if shape_choice.kernel == 'triton' else (1, 5, 9, MAX_ROWS)):
            for dtype in {torch.bfloat16, compute_dtype}:
                x = torch.randn(rows, shape[1], device='cuda', dtype=dtype)
                expected = dequantized_reference(module, x)
                out = matmul(x, weight, shape_choice)
                assert torch.isfinite(out).all() and out.dtype == dtype
                error = (out.float() - expected).abs().max().item()
                assert error <= 1e-2 * expected.abs().max().item(), (shape_choice, rows, dtype)


@cuda
def test_bf16_x_with_fp16_compute_gives_the_bits_of_the_converted_launch():
    """A model of bf16 layers with fp16 compute (the article's): the CUDA kernel reads bf16 x
    and writes bf16 out itself, with the bits of x.to(float16), the fp16 launch and
    .to(bfloat16); every CUDA shape the tuner tries, one weight and a group, 1-16 rows."""
    for widths, in_features in (((256,), 640), ((384, 128, 128), 640)):
        weights = [nf4_weight(nf4_linear(width, in_features, torch.float16, bias=False,
                                         seed=seed)) for seed, width in enumerate(widths)]
        matmul = NF4Matmul()
        shapes = [shape for shape in matmul.candidates(list(widths), in_features, 132,
                                                       cuda=True) if shape.kernel == 'cuda']
        assert shapes
        for shape in shapes:
            for rows in (1, 5, 9, MAX_ROWS):
                x = torch.randn(rows, in_features, device='cuda', dtype=torch.bfloat16) * 4
                x[0, :8] = torch.tensor([6e4, -6e4, 1e-9, 3.0, 0.0, -0.0, 1e-5, 3e-8])
                outs = matmul.grouped(x, weights, shape)
                converted = matmul.grouped(x.to(torch.float16), weights, shape)
                for out, reference in zip(outs, converted):
                    assert out.dtype == torch.bfloat16
                    torch.testing.assert_close(out, reference.to(torch.bfloat16), rtol=0,
                                               atol=0, equal_nan=True, msg=str((shape, rows)))


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
def test_cuda_grouped_launch_matches_each_layer(compute_dtype):
    modules = [nf4_linear(width, 640, compute_dtype, bias=False, seed=seed)
               for seed, width in enumerate((384, 128, 128))]
    matmul = NF4Matmul()
    group = matmul.group_linear_for(modules)
    assert group is not None
    assert matmul.group_linear_for([modules[0], nf4_linear(64, 320, compute_dtype)]) is None
    for rows in (1, 4, MAX_ROWS, MAX_ROWS + 3):  # the last: each layer its own way
        x = torch.randn(rows, 640, device='cuda', dtype=torch.bfloat16)
        outs = group(x)
        assert [tuple(out.shape) for out in outs] == [(rows, 384), (rows, 128), (rows, 128)]
        for out, module in zip(outs, modules):
            expected = dequantized_reference(module, x)
            assert (out.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
def test_cuda_kernel_grouped_launches_match_each_layer(compute_dtype):
    modules = [nf4_linear(width, 640, compute_dtype, bias=False, seed=seed)
               for seed, width in enumerate((384, 128, 128))]
    weights = [nf4_weight(module) for module in modules]
    matmul = NF4Matmul()
    shapes = [shape for shape in matmul.candidates([384, 128, 128], 640, 132, cuda=True)
              if shape.kernel == 'cuda']
    assert shapes
    for shape in shapes:
        for rows in (1, 8, MAX_ROWS):
            x = torch.randn(rows, 640, device='cuda', dtype=compute_dtype)
            outs = matmul.grouped(x, weights, shape)
            for out, module in zip(outs, modules):
                expected = dequantized_reference(module, x)
                assert (out.float() - expected).abs().max() <= 1e-2 * expected.abs().max(), shape


@cuda
@pytest.mark.parametrize('shape', [LaunchShape(64, 8), LaunchShape(16, 4, 4, 4, 'cuda'),
                                   LaunchShape(32, 2, 4, 2, 'cuda')])
def test_cuda_split_reduction_is_deterministic_and_leaves_its_counters_reset(shape):
    module = nf4_linear(512, 4096, torch.bfloat16, bias=False)
    matmul = NF4Matmul()
    weight = nf4_weight(module)
    x = torch.randn(3, 4096, device='cuda', dtype=torch.bfloat16)
    first = matmul(x, weight, shape)
    for _ in range(20):  # a counter left non-zero would make a later launch skip its output
        assert torch.equal(matmul(x, weight, shape), first)
        assert not any(locks.any() for _, locks in matmul._buffers.values())
    expected = dequantized_reference(module, x)
    assert (first.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('nested', [True, False])
def test_shared_memory_table_decode_gives_the_bits_of_the_register_decode(compute_dtype, nested):
    """Every table size, rows in one and two mma column tiles, split or not, grouped."""
    from qwen_vl_perception.model.nf4_cuda import TABLE_COPIES, CudaShape, fits
    modules = [nf4_linear(width, 1280, compute_dtype, nested=nested, bias=False, seed=seed)
               for seed, width in enumerate((256, 64, 64))]
    weights = [nf4_weight(module) for module in modules]
    matmul = NF4Matmul()
    compared = 0
    for warps, row_tiles, pipe, splits in ((4, 1, 4, 1), (4, 2, 2, 2), (8, 1, 4, 1)):
        plain = LaunchShape(16 * row_tiles, splits, warps, pipe, 'cuda')
        for rows in (1, 8, 9, MAX_ROWS):
            x = torch.randn(rows, 1280, device='cuda', dtype=compute_dtype)
            expected = matmul.grouped(x, weights, plain)
            single = matmul(x, weights[0], plain)
            for table in TABLE_COPIES[1:]:
                if not fits(CudaShape(warps, row_tiles, pipe, table)):
                    continue
                shape = LaunchShape(16 * row_tiles, splits, warps, pipe, 'cuda', table)
                for out, reference in zip(matmul.grouped(x, weights, shape), expected):
                    assert torch.equal(out, reference), (shape, rows)
                assert torch.equal(matmul(x, weights[0], shape), single), (shape, rows)
                compared += 1
    assert compared >= 3 * 4 * 3


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('nested', [True, False])
def test_cuda_prefill_path_dequantizes_to_bitsandbytes_values(compute_dtype, nested):
    module = nf4_linear(1024, 2560, compute_dtype, nested=nested)
    matmul = NF4Matmul()
    expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    expected = expected.to(compute_dtype)
    out = matmul.dequantize(nf4_weight(module))
    assert out.shape == expected.shape and out.dtype == compute_dtype
    assert (out == expected).float().mean().item() >= 0.999
    x = torch.randn(2, 20, 2560, device='cuda', dtype=torch.bfloat16)  # 40 rows: prefill
    ours, theirs = matmul.linear_for(module)(x), module(x)
    assert ours.shape == theirs.shape == (2, 20, 1024)
    assert (ours.float() - theirs.float()).abs().max() <= 1e-2 * theirs.float().abs().max()


@cuda
def test_cuda_kernel_leaves_rows_below_min_rows_to_bitsandbytes_and_replays_in_a_graph():
    module = nf4_linear(256, 512, torch.bfloat16)
    linear = NF4Matmul(min_rows=3).linear_for(module)
    for rows in (1, 2):  # below min_rows: bitsandbytes' own forward
        x = torch.randn(rows, 512, device='cuda', dtype=torch.bfloat16)
        assert torch.equal(linear(x), module(x))
    x = torch.randn(4, 512, device='cuda', dtype=torch.bfloat16)
    eager = linear(x)  # tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = linear(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, linear(x))
    assert not torch.equal(captured, eager)


@cuda
def test_cuda_kernel_replays_in_a_graph():
    module = nf4_linear(1024, 2560, torch.bfloat16, bias=False)
    matmul, weight = NF4Matmul(), nf4_weight(module)
    shape = LaunchShape(16, 2, 4, 8, 'cuda')
    x = torch.randn(1, 2560, device='cuda', dtype=torch.bfloat16)
    eager = matmul(x, weight, shape)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = matmul(x, weight, shape)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, matmul(x, weight, shape))
    assert not torch.equal(captured, eager)


@cuda
def test_cuda_kernel_that_cannot_build_warns_once_and_leaves_triton(monkeypatch):
    from qwen_vl_perception.model import nf4_cuda

    def fail(*args, **kwargs):
        raise RuntimeError('nf4_mma does not compile')
    monkeypatch.setattr(nf4_cuda, 'kernel_for', fail)
    module = nf4_linear(256, 512, torch.bfloat16, bias=False)
    other = nf4_linear(512, 512, torch.bfloat16, bias=False)
    matmul = NF4Matmul()
    x = torch.randn(2, 512, device='cuda', dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match='CUDA NF4 decode kernel failed'):
        out = matmul.linear_for(module)(x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once: the second layer shape tunes without a word
        matmul.linear_for(other)(x)
    assert all(entry['shape']['kernel'] == 'triton' for entry in matmul.tuned_shapes())
    expected = dequantized_reference(module, x)
    assert (out.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


@cuda
def test_the_tuner_times_9_to_16_rows_apart_from_1_to_8():
    module = nf4_linear(1024, 2560, torch.bfloat16, bias=False)
    matmul = NF4Matmul()
    linear = matmul.linear_for(module)
    for rows in (1, 12):
        x = torch.randn(rows, 2560, device='cuda', dtype=torch.bfloat16)
        expected = dequantized_reference(module, x)
        assert (linear(x).float() - expected).abs().max() <= 1e-2 * expected.abs().max()
    entries = matmul.tuned_shapes()
    assert [entry['rows'] for entry in entries] == ['1-8', '9-16']
    assert all(entry['timed_ms'] for entry in entries)


@cuda
def test_decoder_with_the_kernel_agrees_with_bitsandbytes_path():
    from decoding import STOPS, make_inputs, tiny_model
    model = tiny_model(seed=3).to('cuda', torch.bfloat16)
    language_model = model.model.language_model
    for layer in language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _quantized_copy(child))
    layers = len(language_model.layers)
    for prompts in ([(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8)), (4, 4, (1, 4, 4)), (6, 1, None)],
                    [(3, 5, (1, 4, 6))]):  # four rows, then one
        inputs = {k: v.cuda() for k, v in make_inputs(prompts).items()}
        plain = FastGreedyDecoder(nf4_kernel=False)
        reference, _ = plain(model, inputs, 32, [])
        fused = FastGreedyDecoder(nf4_kernel=True)
        fused(model, inputs, 32, STOPS)
        assert fused.last_session_nf4_layers == 7 * layers
        assert fused.last_session_nf4_groups == 2 * layers  # (q, k, v) and (gate, up)
        # The step ran at that many rows (a prompt of 16 tokens or fewer is tuned for
        # prefill too: the single prompt below has 16).
        assert len(prompts) in fused.kernel_choices.nf4_matmul.tuned_rows
        # Prefill ran through the kernels too, and every module has its own forward back.
        assert fused.kernel_choices.nf4_layer_count(model) == 7 * layers
        assert not any('forward' in module.__dict__ for module in model.modules())
        choices = fused.choices_given(model, inputs, reference)
        same = sum(a == b for row, ref in zip(choices, reference) for a, b in zip(row, ref))
        assert same >= 0.9 * 32 * len(reference)


def _quantized_copy(child, compute_dtype=torch.bfloat16):
    module = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                               compute_dtype=compute_dtype, compress_statistics=True,
                               quant_type='nf4', device='meta')
    module.weight = bnb.nn.Params4bit(
        child.weight.data.clone(), requires_grad=False, compress_statistics=True,
        quant_type='nf4', module=module).to('cuda')
    return module


class _CountingMatmul:
    """Stands in for NF4Matmul in the decoder's plumbing tests: it takes every plain linear of
    the language model and computes exactly what the layer computes, counting calls (or
    failing, to test the fallback)."""

    def __init__(self, fail=False):
        self.calls = 0
        self.made = 0
        self.fail = fail

    def linear_for(self, module):
        if type(module) is not torch.nn.Linear or module.out_features > 1000:
            return None  # lm_head and the vision tower's merger stay as they are
        self.made += 1
        own_forward = type(module).forward

        def linear(x):
            self.calls += 1
            if self.fail:
                raise RuntimeError('kernel failed to compile')
            return own_forward(module, x)
        return linear

    def group_linear_for(self, modules):
        return None  # each layer on its own


def test_decoder_prefill_swaps_forwards_in_and_out_and_follows_compute_dtype():
    from decoding import STOPS, assert_same, make_inputs, tiny_model
    from qwen_vl_perception.model.generation import hf_decode
    model = tiny_model(seed=4)
    inputs = make_inputs([(5, 7, (1, 4, 6)), (2, 3, None)])
    reference = hf_decode(model, inputs, 6, STOPS)
    decoder = FastGreedyDecoder()
    matmul = _CountingMatmul()
    decoder.kernel_choices.nf4_for = lambda device: matmul
    assert_same(reference, decoder(model, inputs, 6, STOPS))
    assert matmul.calls > 0 and not any('forward' in m.__dict__ for m in model.modules())
    made = matmul.made
    decoder(model, inputs, 6, STOPS)
    assert matmul.made == made  # the model's linears were found once...
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.compute_dtype = torch.float32
    decoder(model, inputs, 6, STOPS)
    assert matmul.made > made  # ...and again after their compute dtype changed
    hooked = model.model.language_model.layers[0].mlp.up_proj
    hooked.forward = hooked.forward  # a forward of its own (a hook): left alone
    calls = matmul.calls
    decoder(model, inputs, 6, STOPS)
    assert matmul.calls > calls and 'forward' in hooked.__dict__


def test_decoder_prefill_falls_back_to_the_layers_own_path_when_the_kernel_fails():
    from decoding import STOPS, assert_same, make_inputs, tiny_model
    from qwen_vl_perception.model.generation import hf_decode
    model = tiny_model(seed=5)
    inputs = make_inputs([(5, 7, (1, 4, 6))])
    decoder = FastGreedyDecoder()
    failing = _CountingMatmul(fail=True)
    choices = decoder.kernel_choices
    choices.nf4_for = lambda device: None if choices.nf4_failed else failing
    with pytest.warns(RuntimeWarning, match='kernel failed to compile'):
        result = decoder(model, inputs, 6, STOPS)
    assert_same(hf_decode(model, inputs, 6, STOPS), result)
    assert choices.nf4_failed and failing.calls == 1
    assert not any('forward' in m.__dict__ for m in model.modules())
    decoder(model, inputs, 6, STOPS)
    assert failing.calls == 1  # not tried again
    forced = FastGreedyDecoder(nf4_kernel=True)
    forced.kernel_choices.nf4_for = lambda device: _CountingMatmul(fail=True)
    with pytest.raises(RuntimeError, match='kernel failed'):
        forced(model, inputs, 6, STOPS)


@cuda
def test_overlapped_launches_give_the_bits_of_plain_ones_in_a_graph():
    """A decode layer's chain as a graph replays it: a kernel writes x, the grouped q/k/v
    launch reads it, the attention kernel reads their outputs and the o launch the attention's.
    With programmatic dependent launch (each kernel may start before the previous one ends, on
    compute capability 9.0+) every replay gives the bits of plain launches. (It cannot tell
    whether the launches did overlap: their timing decides that.)"""
    from qwen_vl_perception.model import decode_attention, nvrtc
    if not (decode_attention.overlap_supported('cuda')
            and nvrtc.programmatic_launch_supported('cuda')):
        pytest.skip('programmatic dependent launch needs compute capability 9.0+, a CUDA 12.3 '
                    'driver and a Triton with it')
    heads, groups, head_dim, cache_len, hidden = 8, 4, 128, 384, 2560
    width = heads * groups * head_dim
    q_proj, k_proj, v_proj = (nf4_linear(size, hidden, torch.bfloat16, bias=False, seed=seed)
                              for seed, size in enumerate((width, heads * head_dim,
                                                           heads * head_dim)))
    o_proj = nf4_linear(hidden, width, torch.bfloat16, bias=False, seed=3)
    matmul = NF4Matmul()
    qkv, o = matmul.group_linear_for([q_proj, k_proj, v_proj]), matmul.linear_for(o_proj)
    source = torch.randn(1, hidden, device='cuda', dtype=torch.bfloat16)
    keys, values = (torch.randn(1, heads, cache_len, head_dim, device='cuda',
                                dtype=torch.bfloat16) for _ in range(2))
    key_valid = torch.ones(1, cache_len, dtype=torch.bool, device='cuda')
    position = torch.tensor([200], device='cuda')
    workspace = torch.zeros(decode_attention.workspace_floats(1, heads, cache_len, head_dim),
                            device='cuda')
    locks = torch.zeros(heads, dtype=torch.int32, device='cuda')

    def layer(overlapped):
        matmul.overlap_launches = overlapped
        x = source * 1.5  # a kernel before the chain writes its input
        q, k, v = qkv(x)
        out = torch.empty(1, heads, groups, head_dim, device='cuda', dtype=torch.bfloat16)
        decode_attention.launch(q.view(1, heads, groups, head_dim), keys, values, key_valid,
                                position, out, workspace, locks, 0.088,
                                new_keys=k.view(1, heads, head_dim),
                                new_values=v.view(1, heads, head_dim),
                                overlap=overlapped)
        return o(out.view(1, width))

    layer(False)  # tunes outside the capture
    if any(entry['shape']['kernel'] != 'cuda' for entry in matmul.tuned_shapes()):
        pytest.skip('the tuner picked the Triton kernel, which has no programmatic launch')
    graphs = {}
    for overlapped in (False, True):
        layer(overlapped)  # compiles outside the capture
        graphs[overlapped] = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(graphs[overlapped][0]):
            graphs[overlapped] = graphs[overlapped][0], layer(overlapped)
    previous = None
    for where in (5, 127, 128, 383):
        position.fill_(where)
        source.copy_(torch.randn_like(source))
        results = {}
        for overlapped in (True, False):
            graphs[overlapped][0].replay()
            results[overlapped] = graphs[overlapped][1].clone()
        assert torch.equal(results[True], results[False]), where
        assert results[True].abs().max() > 0 and not results[True].isnan().any()
        assert previous is None or not torch.equal(previous, results[True])
        previous = results[True]
    assert not locks.any()


@cuda
def test_overlapped_nf4_launches_that_follow_each_other_give_the_bits_of_plain_ones():
    """A decode layer's four NF4 launches as the chain they make once nothing stands between
    them (each reads the output of the one before it, in place), in launch shapes with one and
    four reduction parts (workspace and counters), two row tiles, the shared-memory decode
    table and x a block ahead: with programmatic dependent launch (each kernel lets the next
    in right after its wait; sm_90+), every replay of the graph gives the bits of plain
    launches, for new inputs each time."""
    from qwen_vl_perception.model import nvrtc
    if not nvrtc.programmatic_launch_supported('cuda'):
        pytest.skip('programmatic dependent launch needs compute capability 9.0+ and a CUDA '
                    '12.3 driver')
    hidden, width, inner = 1024, 1536, 2048
    qkv = [nf4_weight(nf4_linear(size, hidden, torch.bfloat16, bias=False, seed=seed))
           for seed, size in enumerate((width, 256, 256))]
    o = [nf4_weight(nf4_linear(hidden, width, torch.bfloat16, bias=False, seed=3))]
    gate_up = [nf4_weight(nf4_linear(inner, hidden, torch.bfloat16, bias=False, seed=seed))
               for seed in (4, 5)]
    down = [nf4_weight(nf4_linear(hidden, inner, torch.bfloat16, bias=False, seed=6))]
    launches = ((qkv, LaunchShape(16, 1, 8, 2, 'cuda')),
                (o, LaunchShape(32, 4, 4, 4, 'cuda', table=2)),
                (gate_up, LaunchShape(16, 2, 8, 4, 'cuda')),
                (down, LaunchShape(16, 4, 4, 4, 'cuda', x_ahead=True)))
    matmul = NF4Matmul()
    source = torch.randn(3, hidden, device='cuda', dtype=torch.bfloat16)

    def chain(overlapped):
        matmul.overlap_launches = overlapped
        x = source * 1.5  # a kernel before the chain writes its input
        for _ in range(2):  # two layers: down's output is the next q+k+v's input
            for weights, shape in launches:
                x = matmul.grouped(x, weights, shape)[0]  # the first output: a view
        return x

    graphs = {}
    for overlapped in (False, True):
        chain(overlapped)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphs[overlapped] = graph, chain(overlapped)
    previous = None
    for _ in range(4):
        source.copy_(torch.randn_like(source))
        results = {}
        for overlapped in (True, False):
            graphs[overlapped][0].replay()
            results[overlapped] = graphs[overlapped][1].clone()
        assert torch.equal(results[True], results[False])
        assert results[True].abs().max() > 0 and not results[True].isnan().any()
        assert previous is None or not torch.equal(previous, results[True])
        previous = results[True]


def _cuda_shapes(matmul, widths, in_features):
    return [shape for shape in matmul.candidates(widths, in_features, 132, cuda=True)
            if shape.kernel == 'cuda']


def _squares(hidden):
    """Each row's sums of squares per 16 columns, laid out as a residual launch writes them."""
    rows, features = hidden.shape
    squares = torch.zeros(features // 16, 16, device=hidden.device)
    squares[:, :rows] = (hidden.float() ** 2).view(rows, -1, 16).sum(-1).T
    return squares


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
def test_folded_residual_launch_adds_with_torchs_bits_and_writes_the_sums_of_squares(
        compute_dtype):
    """The o and down projections' launch: hidden += x @ W.T in place, rounded as torch adds
    two tensors, for every CUDA shape (split reductions included) and 1-16 rows."""
    module = nf4_linear(512, 1024, compute_dtype, bias=False)
    weight, matmul = nf4_weight(module), NF4Matmul()
    shapes = _cuda_shapes(matmul, [512], 1024)
    assert any(shape.splits > 1 for shape in shapes)
    for shape in shapes:
        for rows in (1, 5, MAX_ROWS):
            x = torch.randn(rows, 1024, device='cuda', dtype=compute_dtype)
            hidden = torch.randn(rows, 512, device='cuda', dtype=compute_dtype)
            expected = hidden + matmul(x, weight, shape)
            squares = torch.full((32, 16), float('nan'), device='cuda')
            assert matmul.folded(x, [weight], residual=(hidden, squares), shape=shape) == []
            assert torch.equal(hidden, expected), shape
            torch.testing.assert_close(squares[:, :rows], _squares(expected)[:, :rows],
                                       rtol=1e-5, atol=1e-5)
        assert not any(locks.any() for _, locks in matmul._buffers.values())


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
def test_folded_norm_and_activation_launches_match_the_elementwise_work_done_apart(
        compute_dtype):
    """q/k/v and gate/up from the residual stream (RMSNorm folded in, its statistics from the
    sums of squares), down from gate and up (SiLU x up folded in): as the elementwise kernel
    followed by the plain launch, within a rounding of the norm's statistics."""
    from qwen_vl_perception.model.decode_session import _rms_norm
    modules = [nf4_linear(width, 1024, compute_dtype, bias=False, seed=seed)
               for seed, width in enumerate((512, 128, 128))]
    weights = [nf4_weight(module) for module in modules]
    down = nf4_weight(nf4_linear(256, 1024, compute_dtype, bias=False, seed=5))
    matmul = NF4Matmul()
    norm_weight = (1 + 0.3 * torch.randn(1024, device='cuda')).to(compute_dtype)
    for shape in _cuda_shapes(matmul, [512, 128, 128], 1024):
        for rows in (1, 7, MAX_ROWS):
            scale = 2.0 ** (torch.arange(rows, device='cuda') % 5 - 1)  # rows' rms apart
            hidden = (3 * torch.randn(rows, 1024, device='cuda') * scale[:, None]).to(
                compute_dtype)
            expected = matmul.grouped(_rms_norm(torch, hidden, norm_weight, 1e-6), weights,
                                      shape)
            outs = matmul.folded(hidden, weights, norm=(norm_weight, 1e-6, _squares(hidden)),
                                 shape=shape)
            for out, want in zip(outs, expected):  # row by row: each its own 1 / rms
                error = (out.float() - want.float()).abs().amax(-1)
                assert (error <= 1e-2 * want.float().abs().amax(-1)).all(), shape
            gate_up = torch.randn(rows, 2048, device='cuda', dtype=compute_dtype)
            gated = torch.nn.functional.silu(gate_up[:, :1024].float()) * gate_up[:, 1024:]
            want = matmul(gated.to(compute_dtype), down, shape)
            out = matmul.folded(gate_up, [down], act=True, shape=shape)[0]
            assert (out.float() - want.float()).abs().max() <= 1e-2 * want.abs().max(), shape


@cuda
def test_norm_fold_adds_up_statistics_past_what_it_loads_during_the_loop():
    """The folded norm's sums of squares: the first ones are loaded while the loop runs (enough
    for 2560 columns), the rest after it; at 4096 columns, 4 and 8 warps, both parts count."""
    from qwen_vl_perception.model.decode_session import _rms_norm
    weight = nf4_weight(nf4_linear(256, 4096, torch.bfloat16, bias=False, seed=3))
    matmul = NF4Matmul()
    norm_weight = (1 + 0.3 * torch.randn(4096, device='cuda')).to(torch.bfloat16)
    shapes = [shape for shape in _cuda_shapes(matmul, [256], 4096) if shape.splits == 1]
    assert {shape.num_warps for shape in shapes} >= {4, 8}
    for shape in shapes:
        for rows in (1, MAX_ROWS):
            hidden = torch.randn(rows, 4096, device='cuda').to(torch.bfloat16)
            hidden[:, 3000:] *= 8  # the columns whose statistics come after the loop matter
            want = matmul(_rms_norm(torch, hidden, norm_weight, 1e-6), weight, shape)
            out = matmul.folded(hidden, [weight], norm=(norm_weight, 1e-6, _squares(hidden)),
                                shape=shape)[0]
            error = (out.float() - want.float()).abs().amax(-1)
            assert (error <= 1e-2 * want.float().abs().amax(-1)).all(), (shape, rows)


def _residual_launch_with_the_next_norm(matmul, producer, x, hidden, norm_weight, shape):
    """The o / down launch with ``norm_out`` on ``hidden`` (updated in place): asserts the
    stream's bits (torch's add of the plain launch's product) and the next norm's x (torch's
    multiply); returns the sums of squares it wrote, that x and the expected stream."""
    expected = hidden + matmul(x, producer, shape)
    squares = torch.full((hidden.shape[1] // 16, 16), float('nan'), device='cuda')
    normed = torch.full_like(hidden, float('nan'))
    assert matmul.folded(x, [producer], residual=(hidden, squares),
                         norm_out=(norm_weight, normed), shape=shape) == []
    assert torch.equal(hidden, expected), shape
    assert torch.equal(normed, expected * norm_weight), shape
    return squares, normed, expected


@cuda
def test_residual_launch_writes_the_next_norms_x_and_a_scale_launch_gives_the_norm_folds_bits():
    """o's and down's epilogue (``norm_out``) writes, beside the new residual stream, the next
    norm's weight times it as torch multiplies them; q+k+v and gate+up reading that
    (``scale``) give the bits of the norm folded into their x loads, in every launch shape."""
    producer = nf4_weight(nf4_linear(1024, 512, torch.bfloat16, bias=False, seed=7))
    consumers = [nf4_weight(nf4_linear(width, 1024, torch.bfloat16, bias=False, seed=seed))
                 for seed, width in enumerate((512, 128, 128))]
    matmul = NF4Matmul()
    norm_weight = (1 + 0.3 * torch.randn(1024, device='cuda')).to(torch.bfloat16)
    for rows in (1, 6, MAX_ROWS):
        for shape in _cuda_shapes(matmul, [1024], 512):
            x = torch.randn(rows, 512, device='cuda', dtype=torch.bfloat16)
            hidden = (3 * torch.randn(rows, 1024, device='cuda')).to(torch.bfloat16)
            squares, normed, _ = _residual_launch_with_the_next_norm(
                matmul, producer, x, hidden, norm_weight, shape)
        for shape in _cuda_shapes(matmul, [512, 128, 128], 1024):
            want = matmul.folded(hidden, consumers, norm=(norm_weight, 1e-6, squares),
                                 shape=shape)
            got = matmul.folded(normed, consumers, scale=(1e-6, squares), shape=shape)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), shape
            assert all(out.abs().max() > 0 for out in got)


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
def test_gate_up_launch_writing_silu_times_up_gives_the_act_of_its_two_products(compute_dtype):
    """gate+up with ``act_out``: each CTA takes a gate tile and the up tile of the same rows;
    the products are the bits of the plain grouped launch of the same shape (the same sums in
    the same order), SiLU(gate) * up of them in fp32 rounded once (fast exponentials: within a
    rounding of torch's), in every CUDA shape of paired row tiles (split reductions too),
    1-16 rows, plain x and x scaled by the norm's 1 / rms."""
    gate, up = (nf4_weight(nf4_linear(512, 1024, compute_dtype, bias=False, seed=seed))
                for seed in (5, 6))
    matmul = NF4Matmul()
    shapes = [shape for shape in _cuda_shapes(matmul, [512, 512], 1024)
              if shape.block_n % 32 == 0 and shape.num_warps >= 4]
    assert shapes and any(shape.splits > 1 for shape in shapes)
    step = 2 ** -7 if compute_dtype == torch.bfloat16 else 2 ** -10
    for shape in shapes:
        for rows in (1, 5, 9, MAX_ROWS):
            x = torch.randn(rows, 1024, device='cuda', dtype=compute_dtype)
            squares = _squares(x)
            for fold in ({}, {'scale': (1e-6, squares)}):
                g, u = matmul.folded(x, [gate, up], shape=shape, **fold)
                out, = matmul.folded(x, [gate, up], act_out=True, shape=shape, **fold)
                assert out.shape == (rows, 512)
                want = (torch.nn.functional.silu(g.float()) * u.float()).to(compute_dtype)
                torch.testing.assert_close(out, want, rtol=step, atol=1e-6,
                                           msg=lambda text: f'{shape} {rows} {fold}: {text}')
                assert out.abs().max() > 0
        assert not any(locks.any() for _, locks in matmul._buffers.values())
    assert matmul.foldable(1, [gate, up], act_out=True)
    assert matmul.tuned_shapes()[0]['act_out_fold_shape']['block_n'] % 32 == 0
    with pytest.raises(ValueError, match='pairs'):
        matmul.folded(x, [gate, up], act_out=True,
                      shape=next(shape for shape in _cuda_shapes(matmul, [512, 512], 1024)
                                 if shape.block_n == 16))


@cuda
def test_folds_of_bf16_layers_with_fp16_compute_do_the_elementwise_work_in_bf16():
    """The article's model (bf16 layers, fp16 compute), folded: the residual launch adds the
    product as the unfolded step does (rounded to fp16, then bf16, added in bf16: torch's bits)
    and writes the next norm's x in bf16; q+k+v and gate+up reading it scale each x row by its
    1 / rms before the fp16 product, so that a stream past fp16's range stays finite, within a
    rounding of the norm done apart; gate+up writing SiLU x up, and down with SiLU x up in its
    x loads, within a rounding of that done apart. Every CUDA shape, 1, 6, 12 and 16 rows, each
    row of its own scale (so each its own 1 / rms)."""
    half, bf16 = torch.float16, torch.bfloat16
    producer = nf4_weight(nf4_linear(1024, 512, half, bias=False, seed=7))
    consumers = [nf4_weight(nf4_linear(width, 1024, half, bias=False, seed=seed))
                 for seed, width in enumerate((512, 128, 128))]
    gate, up = (nf4_weight(nf4_linear(512, 1024, half, bias=False, seed=seed))
                for seed in (5, 6))
    down = nf4_weight(nf4_linear(256, 512, half, bias=False, seed=8))
    matmul = NF4Matmul()
    norm_weight = (1.5 + 0.3 * torch.randn(1024, device='cuda')).to(bf16)

    def close(outs, wants, what):
        for out, want in zip(outs, wants):  # row by row: each its own 1 / rms
            assert out.dtype == bf16 and torch.isfinite(out).all(), what
            error = (out.float() - want.float()).abs().amax(-1)
            assert (error <= 1e-2 * want.float().abs().amax(-1)).all(), what

    for rows in (1, 6, 12, MAX_ROWS):
        scale = torch.arange(1, rows + 1, device='cuda')[:, None] ** 1.5  # rows' rms apart
        for shape in _cuda_shapes(matmul, [1024], 512):
            x = torch.randn(rows, 512, device='cuda', dtype=bf16)
            hidden = (3 * torch.randn(rows, 1024, device='cuda') * scale).to(bf16)
            hidden[0, :4] = 6e4  # times the norm's weight: past fp16's 65504
            squares, normed, expected = _residual_launch_with_the_next_norm(
                matmul, producer, x, hidden, norm_weight, shape)
            torch.testing.assert_close(squares[:, :rows], _squares(expected)[:, :rows],
                                       rtol=1e-5, atol=1e-5)
        assert (normed.float().abs() > 65504).any()
        rstd = torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        normal = (normed.float() * rstd).to(half)  # the norm's output as the fp16 layer takes it
        for shape in _cuda_shapes(matmul, [512, 128, 128], 1024):
            close(matmul.folded(normed, consumers, scale=(1e-6, squares), shape=shape),
                  matmul.grouped(normal, consumers, shape), (shape, rows))
        for shape in _cuda_shapes(matmul, [512, 512], 1024):
            g, u = matmul.folded(normed, [gate, up], scale=(1e-6, squares), shape=shape)
            close([g, u], matmul.grouped(normal, [gate, up], shape), (shape, rows))
            if shape.block_n % 32 == 0 and shape.num_warps >= 4:
                out, = matmul.folded(normed, [gate, up], scale=(1e-6, squares), act_out=True,
                                     shape=shape)
                want = (torch.nn.functional.silu(g.float()) * u.float()).to(bf16)
                torch.testing.assert_close(out, want, rtol=2 ** -7, atol=1e-6,
                                           msg=lambda text: f'{shape} {rows}: {text}')
        gate_up = torch.cat([g, u], -1)
        gated = (torch.nn.functional.silu(g.float()) * u.float()).to(bf16)
        for shape in _cuda_shapes(matmul, [256], 512):
            if shape.num_warps >= 4 and shape.splits <= 8:
                close(matmul.folded(gate_up, [down], act=True, shape=shape),
                      [matmul(gated, down, shape)], (shape, rows))
    assert not any(locks.any() for _, locks in matmul._buffers.values())
    assert matmul.foldable(1, consumers, dtype=bf16)
    assert matmul.foldable(1, [gate, up], act_out=True, dtype=bf16)
    assert not matmul.foldable(1, consumers, dtype=torch.float32)
    with pytest.raises(ValueError, match='as a scale'):
        matmul.folded(normed, consumers, norm=(norm_weight, 1e-6, squares))


def test_a_fold_takes_the_fastest_timed_cuda_shape_that_can_fold_whatever_the_tuner_picked():
    """The shape choice alone (the tuner's timings given): the plain launch keeps its pick (a
    Triton shape here); the fold takes the fastest CUDA shape of 4+ warps and at most a split
    per 64-block, SiLU x up out (``act_out``) one of paired row tiles; none without one."""
    from qwen_vl_perception.model.nf4_matmul import LaunchShape
    gate, up = (nf4_weight(nf4_linear(64, 256, torch.bfloat16, bias=False, device='cpu',
                                      seed=seed), require_cuda=False) for seed in (1, 2))
    matmul, flat = NF4Matmul(), torch.zeros(1, 256, dtype=torch.bfloat16)
    key = matmul._shape_key(flat, [gate, up])
    triton = LaunchShape(64, 1, 4, 3)
    two_warps = LaunchShape(16, 1, 2, 4, 'cuda')
    too_split = LaunchShape(16, 8, 4, 4, 'cuda')  # 256 inputs: 4 blocks
    single, paired = LaunchShape(16, 1, 4, 4, 'cuda'), LaunchShape(32, 2, 4, 2, 'cuda')
    matmul._shapes[key] = triton
    matmul._timings[key] = [(1.0, triton), (1.5, two_warps), (2.0, too_split), (3.0, single),
                            (4.0, paired)]
    assert matmul._fold_shape(flat, [gate, up]) == single
    assert matmul._fold_shape(flat, [gate, up], act_out=True) == paired
    assert matmul._shape(flat, [gate, up]) == triton
    other = NF4Matmul()
    other._shapes[key] = triton
    other._timings[key] = [(1.0, triton), (1.5, two_warps), (3.0, single)]
    assert other._fold_shape(flat, [gate, up]) == single
    assert other._fold_shape(flat, [gate, up], act_out=True) is None
    triton_only = NF4Matmul()
    triton_only._shapes[key], triton_only._timings[key] = triton, [(1.0, triton)]
    assert triton_only._fold_shape(flat, [gate, up]) is None


def test_folded_launches_refuse_what_they_cannot_take():
    module = nf4_linear(128, 256, torch.bfloat16, bias=False, device='cpu')
    weight, matmul = nf4_weight(module, require_cuda=False), NF4Matmul()
    assert not matmul.foldable(1, [weight])  # not on CUDA
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match='columns'):
        matmul.folded(x, [weight], act=True)
    with pytest.raises(ValueError, match='compute dtype'):
        matmul.folded(x.float(), [weight])
    with pytest.raises(ValueError, match='tuned'):
        matmul.folded(x, [weight])
    with pytest.raises(ValueError, match='gate and up'):
        matmul.folded(x, [weight], act_out=True)  # one weight
    assert not matmul.foldable(1, [weight, weight], act_out=True)  # not on CUDA
    with pytest.raises(ValueError, match='not two'):
        matmul.folded(torch.zeros(1, 512, dtype=torch.bfloat16), [weight], act=True,
                      norm=(torch.ones(256, dtype=torch.bfloat16), 1e-6, torch.zeros(16, 16)))
    with pytest.raises(ValueError, match='not two'):
        matmul.folded(x, [weight], scale=(1e-6, torch.zeros(16, 16)),
                      norm=(torch.ones(256, dtype=torch.bfloat16), 1e-6, torch.zeros(16, 16)))
    with pytest.raises(ValueError, match='beside a residual'):
        matmul.folded(x, [weight], norm_out=(torch.ones(128, dtype=torch.bfloat16),
                                             torch.zeros(1, 128, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match='rows'):
        matmul.folded(torch.zeros(MAX_ROWS + 1, 256, dtype=torch.bfloat16), [weight])
    with pytest.raises(ValueError, match='residual, not both'):
        matmul.folded(x, [weight], norm=(torch.ones(256, dtype=torch.bfloat16), 1e-6,
                                         torch.zeros(16, 16)),
                      residual=(torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(8, 16)))
    biased = nf4_weight(nf4_linear(128, 256, torch.bfloat16, bias=True, device='cpu'),
                        require_cuda=False)
    assert not matmul.foldable(1, [biased])
    half = nf4_weight(nf4_linear(128, 256, torch.float16, bias=False, device='cpu'),
                      require_cuda=False)  # bf16 x with fp16 compute: the norm as a scale only
    with pytest.raises(ValueError, match='as a scale'):
        matmul.folded(x, [half], norm=(torch.ones(256, dtype=torch.bfloat16), 1e-6,
                                       torch.zeros(16, 16)))
    with pytest.raises(ValueError, match='compute dtype'):
        matmul.folded(x.half(), [weight])  # fp16 x with bf16 compute: no
    from qwen_vl_perception.model import nf4_matmul
    assert set(nf4_matmul._CUDA_X_AHEAD) <= set(nf4_matmul._CUDA_CONFIGS)
    ahead = [shape for shape in NF4Matmul.candidates([2560], 9728, 132, cuda=True)
             if shape.x_ahead]
    assert {(s.num_warps, s.block_n // 16, s.num_stages) for s in ahead} == set(
        nf4_matmul._CUDA_X_AHEAD)


@cuda
def test_a_shape_tuned_to_triton_still_folds_with_its_fastest_cuda_shape_that_can(
        monkeypatch):
    """Where the tuner's pick for the plain launch is the Triton kernel (here made so: its
    timings read 0), the folded launch takes the fastest timed CUDA shape with 4+ warps, so
    that folding a step does not hang on the tuner's noise between two close kernels."""
    timed = NF4Matmul._timed

    def triton_first(self, flat, weights, candidates):
        return [(0.0 if shape.kernel == 'triton' else ms, shape)
                for ms, shape in timed(self, flat, weights, candidates)]
    monkeypatch.setattr(NF4Matmul, '_timed', triton_first)
    module = nf4_linear(512, 1024, torch.bfloat16, bias=False)
    weight, matmul = nf4_weight(module), NF4Matmul()
    assert matmul.foldable(1, [weight])
    entry, = matmul.tuned_shapes()
    assert entry['shape']['kernel'] == 'triton'
    timed, = matmul._timings.values()  # unrounded, as the choice was made
    cuda_timed = [(ms, shape) for ms, shape in timed
                  if shape.kernel == 'cuda' and shape.num_warps >= 4]
    assert entry['fold_shape'] == dataclasses.asdict(min(cuda_timed, key=lambda item: item[0])[1])
    x = torch.randn(1, 1024, device='cuda', dtype=torch.bfloat16)
    hidden = torch.randn(1, 512, device='cuda', dtype=torch.bfloat16)
    expected = hidden + matmul(x, weight)
    matmul.folded(x, [weight], residual=(hidden, torch.zeros(32, 16, device='cuda')))
    torch.testing.assert_close(hidden, expected, rtol=0.02, atol=0.05)  # Triton's sum order


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
def test_decoder_folding_the_elementwise_work_agrees_with_it_done_apart(monkeypatch,
                                                                        compute_dtype):
    """A Qwen3-VL with layer shapes the CUDA kernel takes (the tiny one's 64 inputs are one
    64-block, too few): the folded step (four NF4 launches and the attention per layer) picks
    the tokens of the step with its elementwise kernels, within a rounding of the norms; bf16
    layers with bf16 compute, and with fp16 compute (the article's model)."""
    import transformers

    from decoding import STOPS, make_inputs
    from qwen_vl_perception.model.configs import tiny_config
    # Only CUDA shapes: the tuner may otherwise pick Triton for such small layers
    candidates = NF4Matmul.candidates
    monkeypatch.setattr(NF4Matmul, 'candidates', staticmethod(
        lambda *args, **kwargs: [shape for shape in candidates(*args, **kwargs)
                                 if shape.kernel == 'cuda']))
    config = tiny_config()
    config['text_config'].update(hidden_size=256, intermediate_size=512, head_dim=64,
                                 initializer_range=0.05)
    config['vision_config']['out_hidden_size'] = 256
    torch.manual_seed(4)
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config))
    model = model.eval().to('cuda', torch.bfloat16)
    for layer in model.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, _quantized_copy(child, compute_dtype))
    inputs = {k: v.cuda() for k, v in make_inputs([(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8))]).items()}
    apart = FastGreedyDecoder(nf4_kernel=True, fold_elementwise=False)
    reference, _ = apart(model, inputs, 32, [])
    assert apart.last_session_nf4_layers and not apart.last_session_folds
    default = FastGreedyDecoder(nf4_kernel=True)  # folds where the launches overlap
    overlaps = default.kernel_choices.folds_for('cuda')  # asked before any failure could count
    default(model, inputs, 8, STOPS)
    assert default.last_session_folds == overlaps and not default.kernel_choices.fold_failed
    folded = FastGreedyDecoder(nf4_kernel=True, fold_elementwise=True, fold_act_out=False)
    tokens, _ = folded(model, inputs, 32, STOPS)
    assert folded.last_session_folds and folded.last_timing.graph_captured
    assert not folded.kernel_choices.fold_failed and not folded.kernel_choices.nf4_failed
    choices = folded.choices_given(model, inputs, reference)
    same = sum(a == b for row, ref in zip(choices, reference) for a, b in zip(row, ref))
    assert same >= 0.9 * 32 * len(reference)
    again, _ = folded(model, inputs, 32, STOPS)  # the graph replays the same tokens
    assert again == tokens
    assert not folded.last_session_folds_act_out  # SiLU(gate) * up by a kernel of its own
    act_out = FastGreedyDecoder(nf4_kernel=True, fold_elementwise=True)  # gate+up writes it
    act_out(model, inputs, 32, STOPS)
    assert act_out.last_session_folds and act_out.last_session_folds_act_out
    assert not act_out.kernel_choices.fold_failed and act_out.last_timing.graph_captured
    choices = act_out.choices_given(model, inputs, reference)
    same = sum(a == b for row, ref in zip(choices, reference) for a, b in zip(row, ref))
    assert same >= 0.9 * 32 * len(reference)


@cuda
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
def test_x_loaded_a_block_ahead_gives_the_bits_of_x_loaded_at_use(compute_dtype):
    """``x_ahead`` moves only the x loads: same values, same mma order (split, grouped, 1-16
    rows, folded launches too)."""
    modules = [nf4_linear(width, 1024, compute_dtype, bias=False, seed=seed)
               for seed, width in enumerate((256, 128))]
    weights = [nf4_weight(module) for module in modules]
    matmul = NF4Matmul()
    shapes = _cuda_shapes(matmul, [256, 128], 1024)
    assert any(shape.splits > 1 for shape in shapes)
    norm_weight = (1 + 0.3 * torch.randn(1024, device='cuda')).to(compute_dtype)
    for shape in [shape for shape in shapes if not shape.x_ahead]:
        ahead = dataclasses.replace(shape, x_ahead=True)
        for rows in (1, 8, 9, MAX_ROWS):
            x = torch.randn(rows, 1024, device='cuda', dtype=compute_dtype)
            for out, want in zip(matmul.grouped(x, weights, ahead),
                                 matmul.grouped(x, weights, shape)):
                assert torch.equal(out, want), (shape, rows)
            gate_up = torch.randn(rows, 2048, device='cuda', dtype=compute_dtype)
            assert torch.equal(matmul.folded(gate_up, weights[:1], act=True, shape=ahead)[0],
                               matmul.folded(gate_up, weights[:1], act=True, shape=shape)[0])
            if shape.num_warps >= 4:
                norm = (norm_weight, 1e-6, _squares(x))
                for out, want in zip(matmul.folded(x, weights, norm=norm, shape=ahead),
                                     matmul.folded(x, weights, norm=norm, shape=shape)):
                    assert torch.equal(out, want), (shape, rows)


def _clusters_launch():
    from qwen_vl_perception.model import nvrtc
    return (torch.cuda.is_available() and nvrtc.unavailable_reason() is None
            and nvrtc.cluster_launch_supported('cuda'))


@pytest.mark.skipif(not _clusters_launch(), reason='needs a GPU that launches clusters (sm_90+)')
@pytest.mark.parametrize('compute_dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('overlap', [False, True], ids=['plain', 'overlapped'])
def test_a_clustered_split_gives_the_bits_of_the_workspace_split(compute_dtype, overlap):
    """``cluster``: the splits of a row group add up through the cluster's shared memory in
    split order, as the workspace does: the same bits for grouped launches, the residual
    launch with the next norm's x, the norm-scaled launch and gate+up writing SiLU x up, 1-16
    rows, 2-8 splits (8: clusters only, against the kernel's own math); the workspace's
    counters stay untouched."""
    modules = [nf4_linear(width, 1024, compute_dtype, bias=False, seed=seed)
               for seed, width in enumerate((256, 256))]
    gate, up = weights = [nf4_weight(module) for module in modules]
    matmul = NF4Matmul(overlap_launches=overlap)
    norm_weight = (1 + 0.3 * torch.randn(1024, device='cuda')).to(compute_dtype)
    next_weight = (1 + 0.3 * torch.randn(256, device='cuda')).to(compute_dtype)
    for warps, block_n, splits in ((4, 16, 2), (8, 16, 2), (4, 32, 4), (4, 32, 8)):
        workspace = LaunchShape(block_n, min(splits, 4), warps, 4, 'cuda')
        clustered = dataclasses.replace(workspace, splits=splits, cluster=True)
        for rows in (1, 8, 9, MAX_ROWS):
            x = torch.randn(rows, 1024, device='cuda', dtype=compute_dtype)
            got = matmul.grouped(x, weights, clustered)
            if splits <= 4:
                for out, want in zip(got, matmul.grouped(x, weights, workspace)):
                    assert torch.equal(out, want), (clustered, rows)
            for out, module in zip(got, modules):  # 8 splits: as close as the kernel's math
                torch.testing.assert_close(out, module(x), rtol=2e-2, atol=2e-2)
            if splits > 4:
                continue
            squares = _squares(x)
            if block_n % 32 == 0:  # gate+up, norm-scaled, writing SiLU x up
                assert torch.equal(*[matmul.folded(x, [gate, up], act_out=True, shape=shape,
                                                   scale=(1e-6, squares))[0]
                                     for shape in (clustered, workspace)]), (clustered, rows)
            results = []
            for shape in (clustered, workspace):  # o/down: the residual add, the next norm's x
                hidden = torch.randn(rows, 256, device='cuda', dtype=compute_dtype,
                                     generator=torch.Generator('cuda').manual_seed(rows))
                normed = torch.empty_like(hidden)
                sums = torch.full((16, 16), float('nan'), device='cuda')
                matmul.folded(x, [gate], residual=(hidden, sums),
                              norm_out=(next_weight, normed), shape=shape)
                results.append((hidden, normed, sums[:, :rows]))
            for got_part, want_part in zip(*results):
                assert torch.equal(got_part, want_part), (clustered, rows)
            assert torch.equal(matmul.folded(x, weights, norm=(norm_weight, 1e-6, squares),
                                             shape=clustered)[0],
                               matmul.folded(x, weights, norm=(norm_weight, 1e-6, squares),
                                             shape=workspace)[0])
    assert not any(locks.any() for _, locks in matmul._buffers.values())


def test_a_clustered_launch_splits_in_at_most_eight():
    """The portable cluster size: more splits are refused before anything is compiled."""
    from qwen_vl_perception.model import nf4_cuda
    with pytest.raises(ValueError, match='at most 8'):
        nf4_cuda.launch(None, None, None, None, None, [], 1024, 16, 1, nested=True, qblock2=256,
                        bf16=True, shape=nf4_cuda.CudaShape(cluster=True))


def test_the_tuner_knows_each_launch_shapes_layers_only_while_they_live():
    """Linears made by one NF4Matmul are its layers per launch shape (a group apart from its
    singles, each layer once), held weakly: a dropped model's layers leave; off CUDA nothing
    is streamed."""
    import gc
    from qwen_vl_perception.model.nf4_matmul import _layer_key
    weights = [nf4_weight(nf4_linear(64, 128, torch.bfloat16, device='cpu', seed=seed),
                          require_cuda=False) for seed in range(3)]
    matmul = NF4Matmul(tune=False)
    for weight in weights + weights[:1]:
        matmul._add_layer([weight])
    matmul._add_layer(weights[:2])
    single, group = _layer_key(weights[:1]), _layer_key(weights[:2])
    assert single != group
    assert len(matmul._layers[single]) == 3 and len(matmul._layers[group]) == 1
    flat = torch.zeros(1, 128, dtype=torch.bfloat16)
    assert matmul._streamed_layers(flat, weights[:1]) == []  # the CPU: one launch, unstreamed
    weights.pop()
    gc.collect()
    assert matmul._streamed_layers(flat, weights[:1]) == [] and len(matmul._layers[single]) == 2


@cuda
def test_the_tuner_times_a_launch_shape_over_its_layers_as_a_decode_step_meets_them():
    """With enough layers of a shape (more bytes than twice the L2 cache), candidates are timed
    as a chain over them (``timed_over``: how many), a lone layer after an L2 flush; the
    picked shape computes the product."""
    import math
    from qwen_vl_perception.model.nf4_matmul import STREAM_LAYERS
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    count = max(STREAM_LAYERS, math.ceil(2 * l2_bytes / (2560 * 4096 // 2)) + 1)
    modules = [nf4_linear(2560, 4096, torch.bfloat16, bias=False, seed=seed)
               for seed in range(count)]
    matmul = NF4Matmul(overlap_launches=True)
    linears = [matmul.linear_for(module) for module in modules]
    x = torch.randn(1, 4096, device='cuda', dtype=torch.bfloat16)
    out = linears[3](x)
    expected = dequantized_reference(modules[3], x)
    assert (out.float() - expected).abs().max() <= 1e-2 * expected.abs().max()
    entry, = matmul.tuned_shapes()
    assert entry['timed_over'] == count and all(ms > 0 for ms, _ in entry['timed_ms'])
    lone = NF4Matmul()
    lone.linear_for(modules[0])(x)
    assert lone.tuned_shapes()[0]['timed_over'] == 0
