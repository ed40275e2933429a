"""The fused NF4 kernels' view of a bitsandbytes NF4 ``Linear4bit``: its tensors as stored (no
copies), and whether the kernels can run it (:func:`nf4_weight`)."""
from dataclasses import dataclass
from typing import Optional

from .nf4_codes import cached_lookup_asm
from .torch_support import require_torch

QUANT_BLOCK = 64
"""Weights per absmax block (bitsandbytes' NF4 block size, the only one the kernels take)."""


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
    table: tuple = ()
    """The 16 code values (host copies, for kernels that build the table into their code)."""
    tiled: bool = False
    """``packed`` and ``absmax`` in the CUDA kernel's tiled layout (:func:`nf4_cuda.tiled`),
    not as bitsandbytes stores them."""

    def group_key(self) -> tuple:
        """What weights launched together must share."""
        return (self.in_features, self.compute_dtype, self.nested, self.nested_block,
                self.asm, str(self.packed.device), self.absmax.dtype, self.tiled)


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
    if state.blocksize != QUANT_BLOCK or len(state.shape) != 2:
        return None
    out_features, in_features = (int(size) for size in state.shape)
    if in_features % QUANT_BLOCK or weight.dtype != torch.uint8:
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
    table = tuple(code.cpu().tolist())
    return NF4Weight(
        packed=weight.data.view(-1), absmax=state.absmax, absmax2=absmax2, code2=code2,
        code=code, offset=offset, nested=nested, nested_block=nested_block,
        out_features=out_features, in_features=in_features,
        bias=getattr(module, 'bias', None), compute_dtype=compute_dtype,
        asm=cached_lookup_asm(table, compute_dtype), table=table)
