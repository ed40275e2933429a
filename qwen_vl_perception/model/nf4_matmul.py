"""NF4 linear layers for decode steps: our kernels instead of bitsandbytes' path.

For one input row bitsandbytes runs its 4-bit GEMV; for more rows (a batch of frames decoding
together) it dequantizes the whole weight to bf16 and calls a matmul, which writes and reads
the weight again at four times its NF4 size every token. :class:`NF4Matmul` reads the packed
weight once for 1 to :data:`MAX_ROWS` rows, as bitsandbytes stores it (no copy, no repacking:
the model stays an ordinary bitsandbytes model), and decodes it in registers
(:mod:`~qwen_vl_perception.model.nf4_triton`): each byte's two 4-bit codes become their table
values in the compute dtype through byte permutes (:mod:`~qwen_vl_perception.model.nf4_codes`'
:func:`lookup_asm`), tensor cores multiply
them with ``x`` (rows padded to 16) in fp32, and the sums are scaled by each 64-block's absmax.
bitsandbytes rounds ``code * absmax`` to the compute dtype first: results differ by a rounding.
Several weights that share their input (a layer's q, k and v projections; gate and up) can go
through one launch (:meth:`NF4Matmul.group_linear_for`).

For more than :data:`MAX_ROWS` rows (prefill) the weight is dequantized by one kernel into the
compute dtype, to the same values as bitsandbytes' dequantization, and multiplied by
``torch.nn.functional.linear``: bitsandbytes' own path does the same GPU work through several
Python layers and kernels per linear (host time that mattered before the prefill was
graphed, ``static_prefill.py``).

A second kernel computes the same product in CUDA C++ (:mod:`~qwen_vl_perception.model.
nf4_cuda`, compiled at run time by NVRTC): weights straight from memory into each thread's
tensor-core operand registers, no shared memory in its loop. Launch shapes of both (rows of
the weight per program, warps, pipeline depth, how many programs split the reduction) are
timed once per layer shape on the device, outside any CUDA-graph capture, and the fastest
kept, unless ``tune=False`` (then the Triton kernel's default). Where the model has enough
layers of the shape (:data:`STREAM_LAYERS`, more bytes than the L2 cache holds twice), each
shape is timed as a decode step meets it: one launch per layer in a CUDA graph, overlapped as
the step launches them; otherwise one launch after an L2 flush. Where NVRTC is missing or the
CUDA kernel fails to build, one warning and the Triton kernel alone. Needs CUDA and Triton
(which CUDA builds of torch bring); without them :func:`kernel_unavailable_reason` says why
and callers keep bitsandbytes' own path.
"""
import contextlib
import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# The code table (nf4_codes.py) and the weights' view (nf4_weights.py) are importable from here
# too, as they were before they moved.
from .nf4_codes import (LOOKUP_PACK, NF4_TABLE, asm_constraints, lookup_asm,  # noqa: F401
                        table_words)
from .nf4_weights import QUANT_BLOCK, NF4Weight, nf4_weight  # noqa: F401
from .torch_support import require_torch

MAX_ROWS = 16
"""Rows the decode kernel handles; more go through the dequantized weight and ``linear``."""
MAX_GROUP = 3
"""Weights one launch can take."""
_LOOKUP_ASM, _LOOKUP_GATHER = 0, 1
_BLOCK_CONFIGS = ((128, 4, 6), (64, 4, 4), (64, 4, 8), (128, 4, 4), (256, 8, 4), (128, 8, 6))
"""(weight rows per program, warps, pipeline stages); the first is the untimed default. Deep
pipelines keep enough bytes in flight: a product of a few MB is mostly memory latency."""
STREAM_LAYERS = 8
"""Layers of one launch shape (weights made into linears by one :class:`NF4Matmul`, still
alive) from which the tuner times candidates as a chain over them, one launch per layer in a
CUDA graph (with programmatic launch where it is on), rather than one launch after an L2
flush: the single cold launch misranked shapes the chain tells apart (q+k+v at one row: 9.5
against 6.5 us per launch in one process's pick, ``results/benchmark/gpu_cluster_sweep.json``'s
section), the spread of ~0.1 ms/token between processes."""
_SPLIT_TARGETS = (1, 2, 4)  # programs per multiprocessor that split counts aim at
_MAX_SPLITS = 16  # the last program of a tile adds the partials up


_CUDA_CONFIGS = ((4, 1, 8), (4, 2, 4), (8, 1, 4), (4, 1, 4), (4, 1, 6), (4, 2, 2), (8, 1, 2))
"""The CUDA kernel's (warps, row tiles of 16 per warp, blocks in flight per warp), from sweeps
on an H200 (the 4B model's layer shapes at 1, 8 and 16 rows; ``results/benchmark``; (8, 1, 2)
was the fastest for q+k+v and down in ``gpu_table_sweep.json``)."""
_CUDA_SPLITS = (1, 2, 4)
_CUDA_X_AHEAD = ((4, 1, 4),)
"""Configs of ``_CUDA_CONFIGS`` also tried with ``x`` loaded a block ahead: the fastest shape
for down at 1 and 8 rows in ``gpu_x_ahead_sweep.json`` (13.4 us against 14.4 loaded at use);
no gain elsewhere."""
_CUDA_TABLES = (0,)
"""Decodes the tuner tries per CUDA shape: byte permutes (0) or a shared-memory table of that
many copies. The table is not tried: on the H200 it is slower on every launch of a decode step
but k alone (``results/benchmark/gpu_table_sweep.json``)."""


@dataclass(frozen=True)
class LaunchShape:
    """A launch of the Triton kernel (``kernel='triton'``: ``block_n`` weight rows per program,
    warps, pipeline stages) or of the CUDA one (``kernel='cuda'``: ``block_n`` = 16 x row tiles
    per warp, ``num_stages`` = blocks in flight per warp, ``table`` copies of its shared-memory
    decode table or 0 to decode in registers, ``x_ahead``: ``x`` loaded a block ahead,
    ``cluster``: a split reduction's CTAs one thread-block cluster, sm_90+, at most
    ``nf4_cuda.MAX_CLUSTER_SPLITS`` splits, :class:`nf4_cuda.CudaShape`; the same bits, not
    faster on the H200, so :meth:`NF4Matmul.candidates` does not try it); ``splits`` parts of
    the reduction."""
    block_n: int
    splits: int
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = 'triton'
    table: int = 0
    x_ahead: bool = False
    cluster: bool = False


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


class NF4Matmul:
    """``x @ W.T + b`` for NF4 weights and ``min_rows`` to :data:`MAX_ROWS` rows of ``x``.

    Launches of one instance share workspaces: run them on one stream (as a decode step does).
    ``overlap_launches``: the CUDA kernel starts with programmatic dependent launch where the
    GPU has it (compute capability 9.0+): its first weight loads overlap the end of the kernel
    before it (:mod:`nf4_cuda`); off by default here (the fast decoder turns it on).
    """

    def __init__(self, tune: bool = True, min_rows: int = 1, overlap_launches: bool = False):
        if not 1 <= min_rows <= MAX_ROWS:
            raise ValueError(f'min_rows must be between 1 and {MAX_ROWS}')
        self.tune = tune
        self.min_rows = int(min_rows)
        self.overlap_launches = bool(overlap_launches)
        self._programmatic: Dict[int, bool] = {}  # device index: programmatic launch possible
        self._clusters: Dict[int, bool] = {}  # device index: cluster launches possible
        self._shapes: Dict[Tuple, LaunchShape] = {}
        self._timings: Dict[Tuple, list] = {}
        # (shape key, act_out) -> the fastest timed shape that can fold, or None
        self._fold_shapes: Dict[Tuple, Optional[LaunchShape]] = {}
        self._buffers: Dict[Tuple, Tuple[object, object]] = {}
        self._sm_count: Dict[int, int] = {}
        self._rows: set = set()
        self._cuda_kernel: Dict[int, Optional[str]] = {}  # device index: why not, or None
        # (widths, group key) -> {packed pointers: weakrefs of a launch's weights}: the layers
        # of each launch shape, for streamed tuning (weak: they live as long as the model)
        self._layers: Dict[Tuple, Dict[Tuple, list]] = {}
        self._timed_over: Dict[Tuple, int] = {}  # shape key -> layers streamed (0: cold)

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
        self._add_layer([weight])
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
        self._add_layer(weights)
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
        if shape is not None and shape.splits > weights[0].in_features // QUANT_BLOCK:
            raise ValueError(f'{shape} splits {weights[0].in_features // QUANT_BLOCK} blocks '
                             'into too many parts')
        widths = [weight.out_features for weight in weights]
        if rows == 0:
            return [torch.empty(*leading, width, dtype=x.dtype, device=x.device)
                    for width in widths]
        self._rows.add(rows)
        flat = x.reshape(rows, x.shape[-1])
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
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

    def foldable(self, rows: int, weights: Sequence[NF4Weight], act_out: bool = False,
                 dtype=None) -> bool:
        """Whether ``weights`` (one, or a group sharing their input) at ``rows`` rows can
        launch the CUDA kernel with the decode step's elementwise work folded in
        (:meth:`folded`): no bias, and a CUDA shape that can fold among those the tuner timed
        for their shape (timed now if this shape is new: call it outside CUDA-graph capture).
        The folded launch takes the fastest of those even where the tuner's pick for the plain
        launch is another (the Triton kernel, within timing noise of it, say), so that the
        step's folding does not hang on that noise. ``act_out``: as :meth:`folded` with
        ``act_out`` (gate and up of one width; a shape of an even number of row tiles).
        ``dtype``: that of ``x`` and the stream (default: the compute dtype; bf16 also goes
        with fp16 compute)."""
        torch = require_torch()
        weights = list(weights)
        if not (1 <= rows <= MAX_ROWS and 1 <= len(weights) <= MAX_GROUP) or any(
                weight.bias is not None or weight.tiled for weight in weights):
            return False
        first = weights[0]
        if len({weight.group_key() for weight in weights}) != 1 or first.packed.device.type \
                != 'cuda' or not _cuda_layout(weights):
            return False
        if act_out and (len(weights) != 2 or weights[0].out_features != weights[1].out_features):
            return False
        dtype = first.compute_dtype if dtype is None else dtype
        if not _folds_in(torch, dtype, first.compute_dtype):
            return False
        probe = torch.zeros(rows, first.in_features, dtype=dtype, device=first.packed.device)
        with _on_device(torch, probe.device):
            return self._fold_shape(probe, weights, act_out) is not None

    def _fold_shape(self, flat, weights, act_out: bool = False) -> Optional[LaunchShape]:
        """The fastest timed CUDA shape for ``flat`` and ``weights`` that can fold (4 warps or
        more, at most a split per 64-block; with ``act_out`` an even number of row tiles), or
        None; the shape is tuned first if new."""
        key = self._shape_key(flat, weights)
        if (key, act_out) not in self._fold_shapes:
            tuned = self._shape(flat, weights)
            blocks = weights[0].in_features // QUANT_BLOCK
            fits = [(ms, shape) for ms, shape in self._timings.get(key) or [(0.0, tuned)]
                    if shape.kernel == 'cuda' and shape.num_warps >= 4 and shape.splits <= blocks
                    and not (act_out and shape.block_n % 32)]
            self._fold_shapes[key, act_out] = (min(fits, key=lambda item: item[0])[1] if fits
                                               else None)
        return self._fold_shapes[key, act_out]

    def folded(self, x, weights: Sequence[NF4Weight], *, norm=None, act: bool = False,
               residual=None, scale=None, norm_out=None, act_out: bool = False,
               shape: Optional[LaunchShape] = None):
        """One launch of the CUDA kernel for ``weights`` (:meth:`foldable` said yes) with the
        decode step's elementwise work folded in. ``x``: ``(rows, in)`` in the compute dtype
        (or bf16 with fp16 compute: the storage dtype of every tensor below but ``squares``,
        the product then fp16, as :meth:`grouped` takes bf16 there), or ``(rows, 2 * in)``
        gate then up with ``act``: the product of SiLU(gate) * up.
        ``norm = (weight, eps, squares)``: the product of Qwen3's RMSNorm of ``x`` (``x`` the
        residual stream; ``squares`` as a ``residual`` launch wrote them for it). ``residual =
        (hidden, squares)`` (one weight): ``hidden`` ``(rows, out)`` becomes ``hidden + x @
        W.T`` in place, and ``squares`` (fp32, ``(out / 16, 16)``) each row's sums of squares
        of it per 16 columns. ``norm_out = (weight, normed)`` (with ``residual``): also
        ``normed`` ``(rows, out)``, laid out as ``hidden``, = the next norm's ``weight`` times
        the new ``hidden``, the ``x`` of a ``scale`` launch. ``scale = (eps, squares)``: the
        product of Qwen3's RMSNorm with ``x`` already its weight times the residual stream
        (``squares`` its sums of squares): the norm fold's bits, with nothing done to ``x`` in
        the launch (bf16 ``x`` with fp16 compute: each row scaled by its 1 / rms before it is
        rounded to fp16, the sums then left as they are). ``act_out`` (``weights`` gate and
        up, one width): one output, SiLU(x @ gate.T) * (x @ up.T), each product rounded first
        (needs a shape of an even number of row tiles). ``shape``: a CUDA launch shape instead
        of the one :meth:`foldable` found. Returns the outputs (none with ``residual``). The
        folded norm scales the sums by 1 / rms instead of rounding ``x * rstd`` first, and the
        SiLU uses fast exponentials: results differ by roundings from the unfolded step's (the
        residual add does not)."""
        torch = require_torch()
        weights = list(weights)
        if not 1 <= len(weights) <= MAX_GROUP or len({w.group_key() for w in weights}) != 1:
            raise ValueError(f'a folded launch takes 1 to {MAX_GROUP} weights sharing input '
                             'size, compute dtype, layout and device')
        first = weights[0]
        compute = first.compute_dtype
        rows, columns = x.shape
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f'a folded launch takes 1 to {MAX_ROWS} rows, got {rows}')
        in_features = first.in_features
        if columns != in_features * (2 if act else 1):
            raise ValueError(f'x has {columns} columns for a layer of {in_features} inputs'
                             + (' (gate and up)' if act else ''))
        if sum((norm is not None, act, scale is not None)) > 1:
            raise ValueError('a launch folds a norm, an activation or a scale into x, not two')
        if norm is not None and residual is not None:
            raise ValueError('a launch folds a norm into x or adds a residual, not both')
        if norm_out is not None and residual is None:
            raise ValueError("norm_out writes the next norm's x beside a residual stream")
        store = x.dtype  # of x, the outputs, the stream and the norms' weights
        if (not _folds_in(torch, store, compute) or x.stride(1) != 1 or x.stride(0) % 8
                or x.data_ptr() % 16):
            raise ValueError('folded launches take x in the compute dtype (or bf16 with fp16 '
                             'compute), rows contiguous and 16-byte aligned')
        if norm is not None and store != compute:
            raise ValueError('bf16 x with fp16 compute: the norm folds as a scale (x its weight '
                             'times the stream, as norm_out writes it), not into the x loads')
        if act_out and (len(weights) != 2 or weights[0].out_features != weights[1].out_features
                        or residual is not None or act):
            raise ValueError('act_out takes gate and up (two weights of one width), no residual '
                             'and no activation into x')
        if shape is None:
            key = self._shape_key(x[:, :in_features], weights)
            shape = self._fold_shapes.get((key, act_out))
            if shape is None and not act_out:
                shape = self._shapes.get(key)
        if shape is None or shape.kernel != 'cuda':
            raise ValueError('folded launches need the CUDA kernel tuned for this layer shape '
                             '(foldable)')
        if shape.num_warps < 4 or shape.splits > in_features // QUANT_BLOCK:
            raise ValueError(f'{shape} cannot fold: at least 4 warps, at most a split per '
                             '64-block')
        if act_out and shape.block_n % 32:
            raise ValueError(f'{shape} cannot write SiLU(gate) * up: gate and up tiles go in '
                             'pairs (block_n a multiple of 32)')
        fold = {'act_out': True} if act_out else {}
        if norm is not None:
            weight, eps, squares = norm
            _check_squares(squares, rows, in_features, 'the norm input')
            if (weight.dtype != store or weight.shape != (in_features,) or weight.stride(0) != 1
                    or weight.data_ptr() % 16 or weight.device != x.device):
                raise ValueError("the norm weight must be contiguous, 16-byte aligned, in x's "
                                 "dtype, on x's device")
            fold['norm'] = (weight, squares, float(eps))
        if act:
            fold['act_offset'] = in_features
        if scale is not None:
            eps, squares = scale
            _check_squares(squares, rows, in_features, 'the norm input')
            fold['scale'] = (squares, float(eps))
        widths = [weight.out_features for weight in weights]
        if residual is not None:
            if len(weights) != 1:
                raise ValueError('a residual launch takes one weight')
            out, squares = residual
            _check_squares(squares, rows, widths[0], 'the residual output')
            if out.shape != (rows, widths[0]) or out.dtype != store or out.stride(1) != 1:
                raise ValueError(f"the residual stream must be ({rows}, {widths[0]}) in x's "
                                 'dtype')
            fold['squares_out'] = squares
            if norm_out is not None:
                weight, normed = norm_out
                if (weight.dtype != store or weight.shape != (widths[0],)
                        or weight.stride(0) != 1 or weight.device != x.device):
                    raise ValueError("the next norm weight must be contiguous, in x's dtype, "
                                     "on x's device, one per output")
                if (normed.shape != out.shape or normed.stride() != out.stride()
                        or normed.dtype != store or normed.device != x.device):
                    raise ValueError('the normed output must be laid out as the residual '
                                     'stream')
                fold['norm_out'] = (weight, normed)
        else:
            out = torch.empty(rows, widths[0] if act_out else sum(widths), dtype=store,
                              device=x.device)
        self._rows.add(rows)
        with _on_device(torch, x.device):
            self._launch_cuda(x, out, weights, shape, **fold)
        if residual is not None:
            return []
        if act_out:
            return [out]
        outputs, start = [], 0
        for width in widths:
            outputs.append(out[:, start:start + width])
            start += width
        return outputs

    def dequantize(self, weight: NF4Weight):
        """The weight as an ``(out, in)`` tensor in the compute dtype (bitsandbytes' values)."""
        if weight.tiled:
            raise ValueError('weights in the tiled layout take the CUDA kernel only')
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
        """The launch shapes picked so far, one entry per layer shape and row bucket: the
        weights' widths, input size, compute dtype, rows (``'1-8'`` or ``'9-16'``), the shape,
        the folded launches' shapes where :meth:`foldable` was asked (without and with
        ``act_out``; None: cannot fold or not asked), every candidate's median milliseconds
        (per launch), and over how many layers they were streamed (``timed_over``; 0: one
        launch after an L2 flush)."""
        def fold_shape(key):
            fold = self._fold_shapes.get(key)
            return None if fold is None else dataclasses.asdict(fold)
        return [{'widths': list(key[0]), 'in_features': key[1], 'compute_dtype': str(key[2]),
                 'rows': key[-1], 'shape': dataclasses.asdict(shape),
                 'fold_shape': fold_shape((key, False)),
                 'act_out_fold_shape': fold_shape((key, True)),
                 'timed_ms': [(round(ms, 5), dataclasses.asdict(candidate))
                              for ms, candidate in self._timings.get(key, [])],
                 'timed_over': self._timed_over.get(key, 0)}
                for key, shape in self._shapes.items()]

    # -- launching -----------------------------------------------------------------------

    def _launch(self, flat, out, weights, shape):
        if shape.kernel == 'cuda':
            return self._launch_cuda(flat, out, weights, shape)
        if weights[0].tiled:
            raise ValueError('weights in the tiled layout take the CUDA kernel only')
        from . import nf4_triton
        torch = require_torch()
        first = weights[0]
        blocks = first.in_features // QUANT_BLOCK
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
            constraints=asm_constraints(), pack=LOOKUP_PACK,
            bf16=first.compute_dtype == torch.bfloat16, block_n=shape.block_n,
            num_warps=shape.num_warps, num_stages=shape.num_stages)

    def _launch_cuda(self, flat, out, weights, shape, **fold):
        from . import nf4_cuda
        torch = require_torch()
        if not _cuda_layout(weights):
            raise ValueError('the CUDA NF4 kernel takes widths in multiples of 16 and absmax '
                             'as uint8 (with fp32 second-level scales) or fp32')
        first = weights[0]
        compute = first.compute_dtype
        # bf16 layers with fp16 compute: the kernel rounds x and its product as the copies
        # around an fp16 launch would (and folds its elementwise work in bf16)
        io_bf16 = (compute == torch.float16 and flat.dtype == torch.bfloat16
                   and out.dtype == torch.bfloat16)
        x = flat if flat.dtype == compute or io_bf16 else flat.to(compute)
        if not fold and (x.data_ptr() % 16 or x.stride(0) % 8):  # x is read 16 bytes at a time
            x = x.clone(memory_format=torch.contiguous_format)
        target = out if out.dtype == compute or io_bf16 else torch.empty(
            out.shape, dtype=compute, device=out.device)
        cuda_shape = nf4_cuda.CudaShape(shape.num_warps, shape.block_n // 16, shape.num_stages,
                                        shape.table, shape.x_ahead, shape.cluster)
        if shape.cluster and shape.splits > 1 and not self._clusters_on(flat.device):
            raise ValueError(f'{shape}: this GPU or driver launches no thread-block clusters '
                             '(compute capability 9.0+, CUDA 12+)')
        tiles = sum(weight.out_features // 16 for weight in weights)
        workspace, locks = self._buffers_for(
            flat.device, tiles, shape, groups=nf4_cuda.row_groups(
                [weight.out_features for weight in weights], cuda_shape))
        blocks = first.in_features // QUANT_BLOCK
        nf4_cuda.launch(
            x, target, workspace, locks, first.table,
            [(weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.offset,
              weight.out_features) for weight in weights],
            first.in_features, shape.splits, -(-blocks // shape.splits), nested=first.nested,
            qblock2=first.nested_block, bf16=compute == torch.bfloat16, shape=cuda_shape,
            programmatic=self.overlap_launches and self._programmatic_on(flat.device),
            tiled=first.tiled, io_bf16=io_bf16, **fold)
        if target is not out:
            out.copy_(target)

    def _programmatic_on(self, device) -> bool:
        index = device.index if device.index is not None else require_torch().cuda.current_device()
        if index not in self._programmatic:
            from . import nvrtc
            self._programmatic[index] = nvrtc.programmatic_launch_supported(device)
        return self._programmatic[index]

    def _clusters_on(self, device) -> bool:
        index = device.index if device.index is not None else require_torch().cuda.current_device()
        if index not in self._clusters:
            from . import nvrtc
            self._clusters[index] = nvrtc.cluster_launch_supported(device)
        return self._clusters[index]

    def _buffers_for(self, device, tiles, shape, groups=None):
        """The fp32 workspace for split partials and the tiles' arrival counters (zero between
        launches: the last program of a tile resets its counter)."""
        torch = require_torch()
        key = (str(device), tiles, shape.splits, shape.block_n, shape.kernel)
        buffers = self._buffers.get(key)
        if buffers is None:
            if shape.splits == 1:
                buffers = (torch.empty(1, dtype=torch.float32, device=device),
                           torch.zeros(1, dtype=torch.int32, device=device))
            elif shape.kernel == 'cuda':  # tiles of 16 rows, 256 values; a counter per group
                buffers = (torch.empty(tiles * shape.splits * 256, dtype=torch.float32,
                                       device=device),
                           torch.zeros(groups, dtype=torch.int32, device=device))
            else:
                buffers = (torch.empty(tiles * shape.splits * 16 * shape.block_n,
                                       dtype=torch.float32, device=device),
                           torch.zeros(tiles, dtype=torch.int32, device=device))
            self._buffers[key] = buffers
        return buffers

    # -- launch shapes -----------------------------------------------------------------------

    @staticmethod
    def _shape_key(flat, weights) -> Tuple:
        first = weights[0]
        # Rows 1-8 and 9-16 are tuned apart: the CUDA kernel takes the latter in two mma
        # column tiles, which moves its best shape.
        return (tuple(weight.out_features for weight in weights), first.in_features,
                first.compute_dtype, flat.dtype, str(flat.device), first.nested,
                first.absmax.dtype, _row_bucket(flat.shape[0]))

    def _shape(self, flat, weights) -> LaunchShape:
        torch = require_torch()
        first = weights[0]
        key = self._shape_key(flat, weights)
        shape = self._shapes.get(key)
        if shape is None:
            if flat.device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
                raise RuntimeError('an NF4 layer shape met for the first time during CUDA '
                                   'graph capture: run the step once before capturing it')
            widths = [weight.out_features for weight in weights]
            candidates = self.candidates(
                widths, first.in_features, self._sm_count_of(flat.device),
                cuda=self.tune and self._cuda_kernel_usable(flat.device, weights))
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

    def _cuda_kernel_usable(self, device, weights) -> bool:
        """Whether the CUDA kernel may be tried: rows in tiles of 16, the absmax storage it
        reads (uint8 with fp32 second-level scales, or fp32), compute capability 8 or newer
        and NVRTC there (else one warning per device, and the Triton kernel only)."""
        torch = require_torch()
        if device.type != 'cuda' or not _cuda_layout(weights):
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._cuda_kernel:
            from . import nvrtc
            reason = nvrtc.unavailable_reason()
            if reason is None and torch.cuda.get_device_capability(index)[0] < 8:
                reason = 'it needs compute capability 8.0 or newer'
            if reason is not None:
                warnings.warn(f'the CUDA NF4 decode kernel cannot run ({reason}); the Triton '
                              'kernel decodes alone', RuntimeWarning)
            self._cuda_kernel[index] = reason
        return self._cuda_kernel[index] is None

    @staticmethod
    def candidates(out_features, in_features: int, multiprocessors: int, cuda: bool = False):
        """Launch shapes to try, the untimed default first. ``out_features``: one width or the
        widths of a group. For each (rows per program, warps, stages) the reduction is split
        so that about 1, 2 and 4 programs per multiprocessor run (each split at least two
        64-blocks long). With ``cuda`` the CUDA kernel's shapes follow (widths in multiples of
        16), its reduction split in 1, 2 or 4 (at least a block per warp), a few also with
        ``x`` loaded a block ahead."""
        widths = [out_features] if isinstance(out_features, int) else list(out_features)
        blocks = in_features // QUANT_BLOCK
        most = max(1, min(_MAX_SPLITS, blocks // 2))
        shapes = []
        for block_n, warps, stages in _BLOCK_CONFIGS:
            tiles = sum(math.ceil(width / block_n) for width in widths)
            for per_sm in _SPLIT_TARGETS:
                splits = max(1, min(most, round(per_sm * multiprocessors / tiles)))
                splits = -(-blocks // -(-blocks // splits))  # no empty last split
                shapes.append(LaunchShape(block_n, splits, warps, stages))
        if cuda and not any(width % 16 for width in widths):
            from .nf4_cuda import CudaShape, fits
            for warps, row_tiles, pipe in _CUDA_CONFIGS:
                for table in _CUDA_TABLES:
                    if not fits(CudaShape(warps, row_tiles, pipe, table)):
                        continue
                    for splits in _CUDA_SPLITS:
                        if blocks // splits >= warps:
                            splits = -(-blocks // -(-blocks // splits))
                            for ahead in (False, True) if (warps, row_tiles, pipe) in \
                                    _CUDA_X_AHEAD else (False,):
                                shapes.append(LaunchShape(16 * row_tiles, splits, warps, pipe,
                                                          'cuda', table, ahead))
        return list(dict.fromkeys(shapes))

    def _add_layer(self, weights) -> None:
        entries = self._layers.setdefault(_layer_key(weights), {})
        entries[tuple(weight.packed.data_ptr() for weight in weights)] = [
            weakref.ref(weight) for weight in weights]

    def _streamed_layers(self, flat, weights) -> list:
        """The live layers of ``weights``' launch shape to time candidates over, or [] (too
        few, or fewer bytes than twice the L2 cache: they would be timed from it)."""
        entries = self._layers.get(_layer_key(weights), {})
        layers = []
        for pointers, refs in list(entries.items()):
            layer = [ref() for ref in refs]
            if any(weight is None for weight in layer):
                del entries[pointers]  # its model is gone
            elif layer[0].packed.device == flat.device:
                layers.append(layer)
        if flat.device.type != 'cuda':
            return []
        streamed = sum(weight.packed.numel() for layer in layers for weight in layer)
        l2_bytes = getattr(require_torch().cuda.get_device_properties(flat.device),
                           'L2_cache_size', 0)
        return layers if len(layers) >= STREAM_LAYERS and streamed >= 2 * l2_bytes else []

    def _timed(self, flat, weights, candidates) -> list:
        torch = require_torch()
        out = torch.empty(flat.shape[0], sum(weight.out_features for weight in weights),
                          dtype=flat.dtype, device=flat.device)
        layers = self._streamed_layers(flat, weights)
        self._timed_over[self._shape_key(flat, weights)] = len(layers)
        flush = None if layers else _l2_flush(flat.device)
        timed = []
        for shape in candidates:
            if shape.kernel == 'cuda' and self._cuda_kernel.get(flat.device.index) is not None:
                continue
            try:
                if layers:
                    milliseconds = _streamed_ms(flat.device, lambda: [
                        self._launch(flat, out, layer, shape) for layer in layers]) / len(layers)
                else:
                    milliseconds = _cold_ms(flat.device, lambda: self._launch(
                        flat, out, weights, shape), flush)
            except Exception as error:  # a shape this GPU cannot compile (e.g. shared memory)
                if shape.kernel == 'cuda':  # NVRTC or the driver failed: Triton from here on
                    warnings.warn(f'the CUDA NF4 decode kernel failed ({type(error).__name__}: '
                                  f'{error}); the Triton kernel decodes alone', RuntimeWarning)
                    self._cuda_kernel[flat.device.index] = str(error)
                continue
            timed.append((milliseconds, shape))
        if not timed:
            raise RuntimeError('no launch shape of the NF4 decode kernel ran on this device')
        return timed


def _row_bucket(rows: int) -> str:
    """The tuner's row bucket: one ``mma`` column tile of 8 rows, or two."""
    return '1-8' if rows <= 8 else '9-16'


def _cuda_layout(weights) -> bool:
    """Whether the CUDA kernel reads these weights: rows in tiles of 16, absmax as uint8 with
    fp32 second-level scales, or as fp32."""
    torch = require_torch()
    for weight in weights:
        if weight.nested:
            stored = (weight.absmax.dtype == torch.uint8
                      and weight.absmax2.dtype == weight.code2.dtype == torch.float32)
        else:
            stored = weight.absmax.dtype == torch.float32
        if not stored or weight.out_features % 16:
            return False
    return True


def _folds_in(torch, dtype, compute) -> bool:
    """Whether a folded launch can store ``x`` and its outputs in ``dtype`` with ``compute``
    the product's dtype: the same one, or bf16 around fp16."""
    return dtype == compute or (dtype, compute) == (torch.bfloat16, torch.float16)


def _check_squares(squares, rows: int, features: int, what: str) -> None:
    torch = require_torch()
    if (squares.dtype != torch.float32 or not squares.is_contiguous()
            or squares.numel() < features or features % 16 or rows > 16
            or squares.data_ptr() % 16):
        raise ValueError(f'the sums of squares of {what} must be a contiguous, 16-byte aligned '
                         f'fp32 buffer of ({features // 16}, 16)')


def _check_input(x, weight: NF4Weight) -> None:
    if x.shape[-1] != weight.in_features:
        raise ValueError(f'input has {x.shape[-1]} features, the layer takes '
                         f'{weight.in_features}')


def _on_device(torch, device):
    """Triton launches on the current CUDA device: make it ``device``'s."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _layer_key(weights) -> Tuple:
    """What layers launched the same way share: their widths and group key."""
    return (tuple(weight.out_features for weight in weights), weights[0].group_key())


def _streamed_ms(device, function, rounds: int = 3, replays: int = 2) -> float:
    """Device milliseconds of ``function`` (launches over many layers) in one CUDA graph,
    the median of ``rounds`` timings of ``replays`` replays, after one untimed replay."""
    torch = require_torch()
    function()  # compiles, and makes the launches' buffers outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    graph.replay()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    graph.reset()
    return sorted(times)[len(times) // 2]


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
