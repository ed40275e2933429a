"""NF4 linear layers for decode steps: one fused Triton kernel instead of bitsandbytes' path.

For one input row bitsandbytes runs its 4-bit GEMV; for more rows (a batch of frames decoding
together) it dequantizes the whole weight to bf16 and calls a matmul, which writes and reads
the weight again at four times its NF4 size every token. :class:`NF4Matmul` reads the packed
weight once for up to :data:`MAX_ROWS` rows and dequantizes in registers
(:mod:`~qwen_vl_perception.model.nf4_triton`). It multiplies the NF4 code values (in the
compute dtype) with ``x`` and scales the fp32 sums by each 64-block's absmax, where
bitsandbytes rounds ``code * absmax`` to the compute dtype first: results differ by a rounding.
Below ``min_rows`` rows (default 3) bitsandbytes is kept: on an H200 its GEMV is the faster
one for a single row and its dequantize-and-matmul still slightly so for two; at four rows the
kernel takes ~30% less time, at eight 41-46% less (``tools/benchmark.py --linear-rows``,
``results/benchmark/``; three rows were not measured).

For more than :data:`MAX_ROWS` rows (prefill) the weight is dequantized by one kernel into the
compute dtype, to the same values as bitsandbytes' dequantization, and multiplied by
``torch.nn.functional.linear``: bitsandbytes' own path does the same GPU work through several
Python layers and kernels per linear, and a prefill is bound by that host time.

Launch shapes (tile width, unrolling, lookup method, how many programs split the reduction)
are timed once per (rows, out features, in features, dtype) on the device, outside any
CUDA-graph capture, unless ``tune=False``. Needs CUDA and Triton (which CUDA builds of torch
bring); without them :func:`kernel_unavailable_reason` says why and callers keep
bitsandbytes' own path.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .torch_support import require_torch

MAX_ROWS = 16
"""Rows the fused kernel handles; more go through the dequantized weight and ``linear``."""
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176636, 0.7229568362236023, 1.0)
"""bitsandbytes' NF4 code values; the kernel's select tree has them built in."""
_BLOCK_M = 16
_QUANT_BLOCK = 64
_TILE_WIDTHS = (128, 64)  # the first is the untimed default
_UNROLLS = (2, 1)
_SELECT_TREE, _GATHER = 0, 1


@dataclass
class NF4Weight:
    """A bitsandbytes NF4 ``Linear4bit``'s tensors, as the kernel reads them (no copies)."""

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
    standard_table: bool = True


@dataclass(frozen=True)
class LaunchShape:
    block_n: int
    splits: int
    lookup: int = _SELECT_TREE
    unroll: int = 1
    num_warps: int = 4
    num_stages: int = 3


def kernel_unavailable_reason(device=None) -> Optional[str]:
    """``None`` when the fused kernel can run on ``device`` (default: the current CUDA one)."""
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
    else:
        absmax2 = code2 = state.absmax
        nested_block, offset = 1, 0.0
    compute_dtype = getattr(module, 'compute_dtype', None) or state.dtype
    if compute_dtype not in (torch.bfloat16, torch.float16):
        return None
    code = state.code.to(device=weight.device, dtype=torch.float32)
    standard = bool(torch.equal(code.cpu(), torch.tensor(NF4_TABLE, dtype=torch.float32)))
    return NF4Weight(
        packed=weight.data.view(-1), absmax=state.absmax, absmax2=absmax2, code2=code2,
        code=code, offset=offset, nested=nested, nested_block=nested_block,
        out_features=out_features, in_features=in_features,
        bias=getattr(module, 'bias', None), compute_dtype=compute_dtype,
        standard_table=standard)


class NF4Matmul:
    """``x @ W.T + b`` for NF4 weights and ``min_rows`` to :data:`MAX_ROWS` rows of ``x``."""

    def __init__(self, tune: bool = True, min_rows: int = 3):
        if not 1 <= min_rows <= MAX_ROWS:
            raise ValueError(f'min_rows must be between 1 and {MAX_ROWS}')
        self.tune = tune
        self.min_rows = int(min_rows)
        self._shapes: Dict[Tuple, LaunchShape] = {}
        self._sm_count: Dict[int, int] = {}

    @property
    def tuned_rows(self) -> set:
        """The row counts launch shapes were chosen for so far (the kernel ran at those)."""
        return {key[0] for key in self._shapes}

    def linear_for(self, module) -> Optional[Callable]:
        """A function computing ``module(x)``: the fused kernel for ``min_rows`` to
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

    def __call__(self, x, weight: NF4Weight, shape: Optional[LaunchShape] = None):
        """The product for ``x`` of any row count up to :data:`MAX_ROWS`; ``shape`` forces
        a launch shape (one of :meth:`candidates`) instead of the tuned one."""
        torch = require_torch()
        _check_input(x, weight)
        leading = x.shape[:-1]
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS:
            raise ValueError(f'the fused NF4 kernel takes at most {MAX_ROWS} rows, got {rows}')
        if shape is not None:
            blocks = weight.in_features // _QUANT_BLOCK
            if blocks % shape.splits or (blocks // shape.splits) % shape.unroll:
                raise ValueError(f'{shape} does not split {blocks} blocks evenly')
        from . import nf4_triton
        flat = x.reshape(rows, x.shape[-1]).to(weight.compute_dtype).contiguous()
        with _on_device(torch, flat.device):
            shape = shape or self._shape(flat, weight)
            partial = self._partial(flat, weight, shape)
            self._launch(nf4_triton, flat, weight, shape, partial)
        out = (partial.sum(0) if shape.splits > 1 else partial[0]).to(x.dtype)
        if weight.bias is not None:
            out = out + weight.bias.to(x.dtype)
        return out.view(*leading, weight.out_features)

    # -- launch shapes -----------------------------------------------------------------------

    @staticmethod
    def _launch(nf4_triton, flat, weight, shape, partial):
        nf4_triton.launch(
            flat, weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.code,
            partial, weight.offset, weight.out_features, weight.in_features, shape.splits,
            weight.nested, weight.nested_block, shape.lookup, shape.unroll, _BLOCK_M,
            shape.block_n, shape.num_warps, shape.num_stages)

    def _shape(self, flat, weight) -> LaunchShape:
        key = (flat.shape[0], weight.out_features, weight.in_features, flat.dtype,
               flat.device.index, weight.standard_table)
        shape = self._shapes.get(key)
        if shape is None:
            candidates = self.candidates(weight.out_features, weight.in_features,
                                         self._programs_wanted(flat.device),
                                         weight.standard_table)
            shape = self._fastest(flat, weight, candidates) if self.tune else candidates[0]
            self._shapes[key] = shape
        return shape

    def _programs_wanted(self, device) -> int:
        torch = require_torch()
        if device.type != 'cuda':  # Triton's interpreter (TRITON_INTERPRET=1), for tests
            return 8
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._sm_count:
            self._sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return 2 * self._sm_count[index]

    @staticmethod
    def candidates(out_features: int, in_features: int, programs: int,
                   standard_table: bool = True):
        """Launch shapes to try, the untimed default first. Splits divide the 64-wide blocks
        of the reduction evenly (in groups of the unrolling) and come near ``programs`` and
        twice that many programs in all."""
        blocks = in_features // _QUANT_BLOCK
        divisors = [count for count in range(1, blocks + 1) if blocks % count == 0]
        lookups = (_SELECT_TREE, _GATHER) if standard_table else (_GATHER,)
        shapes = []
        for lookup in lookups:
            for block_n in _TILE_WIDTHS:
                columns = math.ceil(out_features / block_n)
                for unroll in _UNROLLS:
                    valid = [count for count in divisors if (blocks // count) % unroll == 0]
                    if not valid:
                        continue
                    for wanted in (programs, 2 * programs):
                        splits = min(valid, key=lambda count: (abs(count * columns - wanted),
                                                               count))
                        shapes.append(LaunchShape(block_n, splits, lookup, unroll))
        return list(dict.fromkeys(shapes))

    def _fastest(self, flat, weight, candidates) -> LaunchShape:
        from . import nf4_triton
        timed = []
        for shape in candidates:
            partial = self._partial(flat, weight, shape)
            try:
                seconds = _median_ms(flat.device, lambda: self._launch(
                    nf4_triton, flat, weight, shape, partial))
            except Exception:  # a shape this GPU cannot compile (e.g. shared memory)
                continue
            timed.append((seconds, shape))
        if not timed:
            raise RuntimeError('no launch shape of the fused NF4 kernel ran on this device')
        return min(timed, key=lambda item: item[0])[1]

    @staticmethod
    def _partial(flat, weight, shape):
        torch = require_torch()
        return torch.empty(shape.splits, flat.shape[0], weight.out_features, dtype=torch.float32,
                           device=flat.device)


def _check_input(x, weight: NF4Weight) -> None:
    if x.shape[-1] != weight.in_features:
        raise ValueError(f'input has {x.shape[-1]} features, the layer takes '
                         f'{weight.in_features}')


def _on_device(torch, device):
    """Triton launches on the current CUDA device: make it ``device``'s."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _median_ms(device, function, repeats: int = 9) -> float:
    """Median device milliseconds of ``function``, each run after the L2 cache is flushed (a
    decode step reads every weight from memory; timed from cache the ranking would differ)."""
    torch = require_torch()
    function()  # compiles
    if device.type != 'cuda':
        return 0.0
    l2_bytes = getattr(torch.cuda.get_device_properties(device), 'L2_cache_size', 0)
    flush = torch.empty(max(2 * l2_bytes, 1 << 20), dtype=torch.uint8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        function()
        end.record()
    torch.cuda.synchronize(device)
    times = sorted(start.elapsed_time(end) for start, end in zip(starts, ends))
    return times[repeats // 2]
