"""NF4 linear layers for decode steps: one Triton kernel instead of bitsandbytes' path.

For one input row bitsandbytes runs its 4-bit GEMV; for more rows (a batch of frames decoding
together) it dequantizes the whole weight to bf16 and calls a matmul, which writes and reads
the weight again at four times its NF4 size every token. :class:`NF4Matmul` reads the packed
weight once for 1 to :data:`MAX_ROWS` rows, as bitsandbytes stores it (no copy, no repacking:
the model stays an ordinary bitsandbytes model), and decodes it in registers
(:mod:`~qwen_vl_perception.model.nf4_triton`): each byte's two 4-bit codes become their table
values in the compute dtype through byte permutes (:func:`lookup_asm`), tensor cores multiply
them with ``x`` (rows padded to 16) in fp32, and the sums are scaled by each 64-block's absmax.
bitsandbytes rounds ``code * absmax`` to the compute dtype first: results differ by a rounding.
Several weights that share their input (a layer's q, k and v projections; gate and up) can go
through one launch (:meth:`NF4Matmul.group_linear_for`).

For more than :data:`MAX_ROWS` rows (prefill) the weight is dequantized by one kernel into the
compute dtype, to the same values as bitsandbytes' dequantization, and multiplied by
``torch.nn.functional.linear``: bitsandbytes' own path does the same GPU work through several
Python layers and kernels per linear, and a prefill is bound by that host time.

Launch shapes (rows of the weight per program, warps, pipeline depth, how many programs split
the reduction) are timed once per layer shape on the device, outside any CUDA-graph capture,
unless ``tune=False``. Needs CUDA and Triton (which CUDA builds of torch bring); without them
:func:`kernel_unavailable_reason` says why and callers keep bitsandbytes' own path.
"""
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .torch_support import require_torch

MAX_ROWS = 16
"""Rows the decode kernel handles; more go through the dequantized weight and ``linear``."""
MAX_GROUP = 3
"""Weights one launch can take."""
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176636, 0.7229568362236023, 1.0)
"""bitsandbytes' NF4 code values."""
_QUANT_BLOCK = 64
_PACK = 16  # packed bytes per lookup_asm block
_LOOKUP_ASM, _LOOKUP_GATHER = 0, 1
_BLOCK_CONFIGS = ((128, 4, 6), (64, 4, 4), (64, 4, 8), (128, 4, 4), (256, 8, 4), (128, 8, 6))
"""(weight rows per program, warps, pipeline stages); the first is the untimed default. Deep
pipelines keep enough bytes in flight: a product of a few MB is mostly memory latency."""
_SPLIT_TARGETS = (1, 2, 4)  # programs per multiprocessor that split counts aim at
_MAX_SPLITS = 16  # the last program of a tile adds the partials up


def table_words(values: Sequence[float], dtype) -> Tuple[List[int], List[int]]:
    """The 16 table ``values`` rounded to ``dtype`` (bf16 or fp16), as four 32-bit words of
    their high bytes and four of their low bytes (entry ``i`` in byte ``i % 4`` of word
    ``i // 4``), the byte tables :func:`lookup_asm` permutes."""
    torch = require_torch()
    if len(values) != 16:
        raise ValueError(f'an NF4 table has 16 values, got {len(values)}')
    bits = [int(value) & 0xFFFF for value in
            torch.tensor(list(values), dtype=torch.float32).to(dtype).view(torch.int16).tolist()]

    def words(plane):
        return [plane[i] | plane[i + 1] << 8 | plane[i + 2] << 16 | plane[i + 3] << 24
                for i in range(0, 16, 4)]
    return words([value >> 8 for value in bits]), words([value & 0xFF for value in bits])


def lookup_asm(values: Sequence[float], dtype, pack: int = _PACK) -> str:
    """PTX for ``tl.inline_asm_elementwise`` (``pack`` uint8 in, two outputs in ``dtype``): for
    every packed byte the table value of its high nibble (first output) and low nibble.

    Per 32-bit word of 8 codes: ``s`` = the codes' low three bits (a byte index into 8 table
    bytes), ``t`` = a per-byte choice between two permutes made from each code's top bit;
    ``prmt`` looks 4 codes up in entries 0-7 and 8-15 of the high-byte table, keeps one of the
    two per byte, the same for the low bytes, and two more permutes interleave high and low bytes
    into the outputs' 16-bit values. Four table words must sit in registers; they are made from
    the input (``mad.hi`` of it by 1 is 0) so that ptxas keeps them for the whole block rather
    than copying a constant before each permute. Shifts are ``mul.hi`` so that they run on the
    multiply-add units, beside the integer units that do the permutes.
    """
    if pack % 4 or not 4 <= pack <= 32:
        raise ValueError('pack must be a multiple of 4 from 4 to 32')
    high, low = table_words(values, dtype)
    outputs = pack // 2  # 32-bit registers per output
    first = f'${pack}'
    lines = ['{', '.reg .b32 s, t, x, y, h, l, ta, tb, tc, td;']
    for name, word in zip(('ta', 'tb', 'tc', 'td'), (high[0], high[2], low[0], low[2])):
        lines.append(f'mad.hi.u32 {name}, {first}, 1, {word:#x};')
    for word in range(pack // 4):
        codes = f'${pack + word}'
        lines += [f'and.b32 s, {codes}, 0x77777777;', f'mul.hi.u32 t, {codes}, 0x80000000;',
                  'lop3.b32 t, t, 0x44444444, 0x32103210, 0xEA;']  # (t & 0x4444..) | 0x3210..
        for half in range(2):
            if half:
                lines += ['mul.hi.u32 s, s, 0x10000;', 'mul.hi.u32 t, t, 0x10000;']
            register = 2 * word + half
            lines += [f'prmt.b32 x, ta, {high[1]:#x}, s;', f'prmt.b32 y, tb, {high[3]:#x}, s;',
                      'prmt.b32 h, x, y, t;',
                      f'prmt.b32 x, tc, {low[1]:#x}, s;', f'prmt.b32 y, td, {low[3]:#x}, s;',
                      'prmt.b32 l, x, y, t;',
                      f'prmt.b32 ${register}, l, h, 0x7351;',
                      f'prmt.b32 ${outputs + register}, l, h, 0x6240;']
    lines.append('}')
    return '\n'.join(lines)


def asm_constraints(pack: int = _PACK) -> str:
    """The inline-asm constraint string that goes with :func:`lookup_asm`."""
    return ','.join(['=r'] * pack + ['r'] * (pack // 4))


@dataclass
class NF4Weight:
    """A bitsandbytes NF4 ``Linear4bit``'s tensors, as the kernels read them (no copies)."""

    packed: object
    absmax: object
    absmax2: object
    code2: object
    code: object
    offset: float
    nested: bool
    nested_block: int
    out_features: int
    in_features: int
    bias: object
    compute_dtype: object
    asm: str = ''

    def group_key(self) -> tuple:
        """What weights launched together must share."""
        return (self.in_features, self.compute_dtype, self.nested, self.nested_block,
                self.asm, str(self.packed.device), self.absmax.dtype)


@dataclass(frozen=True)
class LaunchShape:
    block_n: int
    splits: int
    num_warps: int = 4
    num_stages: int = 3


def kernel_unavailable_reason(device=None) -> Optional[str]:
    """``None`` when the kernels can run on ``device`` (default: the current CUDA one)."""
    torch = require_torch()
    if device is not None and torch.device(device).type != 'cuda':
        return f'the fused NF4 kernel needs a CUDA device, not {device}'
    if not torch.cuda.is_available():
        return 'the fused NF4 kernel needs CUDA'
    try:
        from . import nf4_triton  # noqa: F401
    except ImportError as error:
        return f'the fused NF4 kernel needs Triton ({error})'
    return None


def nf4_weight(module, require_cuda: bool = True) -> Optional[NF4Weight]:
    """The kernel's view of ``module`` if it is a plain bitsandbytes NF4 ``Linear4bit`` (not a
    wrapper such as a PEFT LoRA layer, whose adapter the kernel would drop) with uint8
    storage that the kernels can run, else None. ``require_cuda=False``: for tests on CPU."""
    torch = require_torch()
    try:
        import bitsandbytes
    except ImportError:
        return None
    if not isinstance(module, bitsandbytes.nn.Linear4bit) or 'weight' not in module._parameters:
        return None
    weight = module.weight
    state = getattr(weight, 'quant_state', None)
    if state is None or getattr(state, 'quant_type', None) != 'nf4':
        return None
    if state.blocksize != _QUANT_BLOCK or len(state.shape) != 2:
        return None
    out_features, in_features = (int(size) for size in state.shape)
    if in_features % _QUANT_BLOCK or weight.dtype != torch.uint8:
        return None
    if require_cuda and weight.device.type != 'cuda':
        return None
    nested = bool(getattr(state, 'nested', False))
    if nested:
        absmax2, code2 = state.state2.absmax, state.state2.code
        nested_block, offset = int(state.state2.blocksize), float(state.offset)
        if nested_block & (nested_block - 1):  # the kernel divides by shifting
            return None
    else:
        absmax2 = code2 = state.absmax
        nested_block, offset = 1, 0.0
    compute_dtype = getattr(module, 'compute_dtype', None) or state.dtype
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return None
    code = state.code.to(device=weight.device, dtype=torch.float32)
    return NF4Weight(
        packed=weight.data.view(-1), absmax=state.absmax, absmax2=absmax2, code2=code2,
        code=code, offset=offset, nested=nested, nested_block=nested_block,
        out_features=out_features, in_features=in_features,
        bias=getattr(module, 'bias', None), compute_dtype=compute_dtype,
        asm=_cached_asm(tuple(code.cpu().tolist()), compute_dtype))


_ASM_CACHE: Dict[tuple, str] = {}


def _cached_asm(values, dtype) -> str:
    key = (values, str(dtype))
    if key not in _ASM_CACHE:
        _ASM_CACHE[key] = lookup_asm(values, dtype)
    return _ASM_CACHE[key]


class NF4Matmul:
    """``x @ W.T + b`` for NF4 weights and ``min_rows`` to :data:`MAX_ROWS` rows of ``x``.

    Launches of one instance share workspaces: run them on one stream (as a decode step does).
    """

    def __init__(self, tune: bool = True, min_rows: int = 1):
        if not 1 <= min_rows <= MAX_ROWS:
            raise ValueError(f'min_rows must be between 1 and {MAX_ROWS}')
        self.tune = tune
        self.min_rows = int(min_rows)
        self._shapes: Dict[Tuple, LaunchShape] = {}
        self._timings: Dict[Tuple, list] = {}
        self._buffers: Dict[Tuple, Tuple[object, object]] = {}
        self._sm_count: Dict[int, int] = {}
        self._rows: set = set()

    @property
    def tuned_rows(self) -> set:
        """The row counts the decode kernel ran at so far."""
        return set(self._rows)

    # -- what callers use ---------------------------------------------------------------

    def linear_for(self, module) -> Optional[Callable]:
        """A function computing ``module(x)``: the decode kernel for ``min_rows`` to
        :data:`MAX_ROWS` rows, the dequantized weight for more, the module's own forward for
        fewer; None if the kernels cannot run ``module`` at all."""
        weight = nf4_weight(module)
        if weight is None:
            return None
        minimum = self.min_rows
        own_forward = type(module).forward  # not module(x): callers may swap module.forward

        def linear(x):
            rows = x.numel() // x.shape[-1]
            if rows > MAX_ROWS:
                return self.dequantized_linear(x, weight)
            if rows < minimum:
                return own_forward(module, x)
            return self(x, weight)
        return linear

    def group_linear_for(self, modules) -> Optional[Callable]:
        """A function computing ``[module(x) for module in modules]`` with one launch for up
        to :data:`MAX_ROWS` rows (each module's own way otherwise); None unless every module
        is one :func:`linear_for` takes and they share input size, compute dtype and layout."""
        weights = [nf4_weight(module) for module in modules]
        if not 2 <= len(weights) <= MAX_GROUP or any(weight is None for weight in weights):
            return None
        if len({weight.group_key() for weight in weights}) != 1:
            return None
        singles = [self.linear_for(module) for module in modules]
        minimum = self.min_rows

        def linears(x):
            rows = x.numel() // x.shape[-1]
            if rows > MAX_ROWS or rows < minimum:
                return [single(x) for single in singles]
            return self.grouped(x, weights)
        return linears

    def __call__(self, x, weight: NF4Weight, shape: Optional[LaunchShape] = None):
        """The product for ``x`` of any row count up to :data:`MAX_ROWS`; ``shape`` forces
        a launch shape (one of :meth:`candidates`) instead of the tuned one."""
        return self.grouped(x, [weight], shape)[0]

    def grouped(self, x, weights: Sequence[NF4Weight], shape: Optional[LaunchShape] = None):
        """``[x @ W.T + b for W in weights]`` in one launch (weights sharing ``x``)."""
        torch = require_torch()
        weights = list(weights)
        if not 1 <= len(weights) <= MAX_GROUP:
            raise ValueError(f'one launch takes 1 to {MAX_GROUP} weights, got {len(weights)}')
        for weight in weights:
            _check_input(x, weight)
        if len({weight.group_key() for weight in weights}) != 1:
            raise ValueError('weights launched together must share input size, compute dtype, '
                             'quantization layout and device')
        leading = x.shape[:-1]
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS:
            raise ValueError(f'the NF4 decode kernel takes at most {MAX_ROWS} rows, got {rows}')
        if shape is not None and shape.splits > weights[0].in_features // _QUANT_BLOCK:
            raise ValueError(f'{shape} splits {weights[0].in_features // _QUANT_BLOCK} blocks '
                             'into too many parts')
        self._rows.add(rows)
        flat = x.reshape(rows, x.shape[-1])
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        widths = [weight.out_features for weight in weights]
        out = torch.empty(rows, sum(widths), dtype=x.dtype, device=x.device)
        with _on_device(torch, flat.device):
            shape = shape or self._shape(flat, weights)
            self._launch(flat, out, weights, shape)
        outputs, start = [], 0
        for weight, width in zip(weights, widths):
            part = out[:, start:start + width]
            if weight.bias is not None:
                part = part + weight.bias.to(x.dtype)
            outputs.append(part.view(*leading, width))
            start += width
        return outputs

    def dequantize(self, weight: NF4Weight):
        """The weight as an ``(out, in)`` tensor in the compute dtype (bitsandbytes' values)."""
        torch = require_torch()
        from . import nf4_triton
        out = torch.empty(weight.out_features, weight.in_features, dtype=weight.compute_dtype,
                          device=weight.packed.device)
        with _on_device(torch, out.device):
            nf4_triton.dequantize(weight.packed, weight.absmax, weight.absmax2, weight.code2,
                                  weight.code, out, weight.offset, weight.nested,
                                  weight.nested_block)
        return out

    def dequantized_linear(self, x, weight: NF4Weight):
        """``x @ W.T + b`` through the dequantized weight, for any number of rows."""
        torch = require_torch()
        _check_input(x, weight)
        bias = None if weight.bias is None else weight.bias.to(weight.compute_dtype)
        out = torch.nn.functional.linear(x.to(weight.compute_dtype), self.dequantize(weight),
                                         bias)
        return out.to(x.dtype)

    def tuned_shapes(self) -> List[dict]:
        """The launch shapes picked so far, one entry per layer shape: the weights' widths,
        input size, compute dtype, the shape, and every candidate's median milliseconds."""
        return [{'widths': list(key[0]), 'in_features': key[1], 'compute_dtype': str(key[2]),
                 'shape': dataclasses.asdict(shape),
                 'timed_ms': [(round(ms, 5), dataclasses.asdict(candidate))
                              for ms, candidate in self._timings.get(key, [])]}
                for key, shape in self._shapes.items()]

    # -- launching -----------------------------------------------------------------------

    def _launch(self, flat, out, weights, shape):
        from . import nf4_triton
        torch = require_torch()
        first = weights[0]
        blocks = first.in_features // _QUANT_BLOCK
        tiles = [math.ceil(weight.out_features / shape.block_n) for weight in weights]
        workspace, locks = self._buffers_for(flat.device, sum(tiles), shape)
        interpreted = flat.device.type != 'cuda'  # Triton's CPU interpreter: no inline PTX
        nf4_triton.launch(
            flat, out, workspace, locks, first.code,
            [(weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.offset,
              weight.out_features) for weight in weights],
            tiles, first.in_features, blocks, shape.splits, -(-blocks // shape.splits),
            nested=first.nested, qblock2=first.nested_block,
            lookup=_LOOKUP_GATHER if interpreted else _LOOKUP_ASM, asm=first.asm,
            constraints=asm_constraints(), pack=_PACK,
            bf16=first.compute_dtype == torch.bfloat16, block_n=shape.block_n,
            num_warps=shape.num_warps, num_stages=shape.num_stages)

    def _buffers_for(self, device, tiles, shape):
        """The fp32 workspace for split partials and the tiles' arrival counters (zero between
        launches: the last program of a tile resets its counter)."""
        torch = require_torch()
        key = (str(device), tiles, shape.splits, shape.block_n)
        buffers = self._buffers.get(key)
        if buffers is None:
            if shape.splits == 1:
                buffers = (torch.empty(1, dtype=torch.float32, device=device),
                           torch.zeros(1, dtype=torch.int32, device=device))
            else:
                buffers = (torch.empty(tiles * shape.splits * 16 * shape.block_n,
                                       dtype=torch.float32, device=device),
                           torch.zeros(tiles, dtype=torch.int32, device=device))
            self._buffers[key] = buffers
        return buffers

    # -- launch shapes -----------------------------------------------------------------------

    def _shape(self, flat, weights) -> LaunchShape:
        torch = require_torch()
        first = weights[0]
        key = (tuple(weight.out_features for weight in weights), first.in_features,
               first.compute_dtype, flat.dtype, str(flat.device), first.nested,
               first.absmax.dtype)
        shape = self._shapes.get(key)
        if shape is None:
            if flat.device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
                raise RuntimeError('an NF4 layer shape met for the first time during CUDA '
                                   'graph capture: run the step once before capturing it')
            widths = [weight.out_features for weight in weights]
            candidates = self.candidates(widths, first.in_features,
                                         self._sm_count_of(flat.device))
            if self.tune:
                self._timings[key] = self._timed(flat, weights, candidates)
                shape = min(self._timings[key], key=lambda item: item[0])[1]
            else:
                shape = candidates[0]
            self._shapes[key] = shape
        return shape

    def _sm_count_of(self, device) -> int:
        torch = require_torch()
        if device.type != 'cuda':  # Triton's interpreter (TRITON_INTERPRET=1), for tests
            return 4
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._sm_count:
            self._sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._sm_count[index]

    @staticmethod
    def candidates(out_features, in_features: int, multiprocessors: int):
        """Launch shapes to try, the untimed default first. ``out_features``: one width or the
        widths of a group. For each (rows per program, warps, stages) the reduction is split
        so that about 1, 2 and 4 programs per multiprocessor run (each split at least two
        64-blocks long)."""
        widths = [out_features] if isinstance(out_features, int) else list(out_features)
        blocks = in_features // _QUANT_BLOCK
        most = max(1, min(_MAX_SPLITS, blocks // 2))
        shapes = []
        for block_n, warps, stages in _BLOCK_CONFIGS:
            tiles = sum(math.ceil(width / block_n) for width in widths)
            for per_sm in _SPLIT_TARGETS:
                splits = max(1, min(most, round(per_sm * multiprocessors / tiles)))
                splits = -(-blocks // -(-blocks // splits))  # no empty last split
                shapes.append(LaunchShape(block_n, splits, warps, stages))
        return list(dict.fromkeys(shapes))

    def _timed(self, flat, weights, candidates) -> list:
        torch = require_torch()
        out = torch.empty(flat.shape[0], sum(weight.out_features for weight in weights),
                          dtype=flat.dtype, device=flat.device)
        flush = _l2_flush(flat.device)
        timed = []
        for shape in candidates:
            try:
                milliseconds = _cold_ms(flat.device, lambda: self._launch(
                    flat, out, weights, shape), flush)
            except Exception:  # a shape this GPU cannot compile (e.g. shared memory)
                continue
            timed.append((milliseconds, shape))
        if not timed:
            raise RuntimeError('no launch shape of the NF4 decode kernel ran on this device')
        return timed


def _check_input(x, weight: NF4Weight) -> None:
    if x.shape[-1] != weight.in_features:
        raise ValueError(f'input has {x.shape[-1]} features, the layer takes '
                         f'{weight.in_features}')


def _on_device(torch, device):
    """Triton launches on the current CUDA device: make it ``device``'s."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _l2_flush(device):
    """A buffer whose zeroing evicts the L2 cache (None off CUDA)."""
    torch = require_torch()
    if device.type != 'cuda':
        return None
    l2_bytes = getattr(torch.cuda.get_device_properties(device), 'L2_cache_size', 0)
    return torch.empty(max(2 * l2_bytes, 128 << 20), dtype=torch.uint8, device=device)


def _cold_ms(device, function, flush, repeats: int = 4, rounds: int = 3) -> float:
    """Device milliseconds of ``function`` with the L2 cache flushed before it (a decode step
    reads every weight from memory; from cache the ranking would differ): CUDA graphs of
    ``repeats`` (flush, function) pairs against ``repeats`` flushes alone, the median of
    ``rounds`` differences. Graph replays leave out the host's launch time, which for one
    small kernel is longer than the kernel."""
    torch = require_torch()
    function()  # compiles, and makes the launch's buffers outside any capture
    if device.type != 'cuda':
        return 0.0
    graphs = []
    for with_function in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                flush.zero_()
                if with_function:
                    function()
        graphs.append(graph)
    differences = []
    for _ in range(rounds):
        times = []
        for graph in graphs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        differences.append((times[0] - times[1]) / repeats)
    for graph in graphs:
        graph.reset()
    return sorted(differences)[rounds // 2]
