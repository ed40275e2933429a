"""NF4's code table as the fused kernels look it up: the 16 values in registers, decoded by
byte permutes.

:func:`lookup_asm` writes the PTX for ``tl.inline_asm_elementwise`` that turns each packed
byte's two 4-bit codes into their table values in the compute dtype (bf16 or fp16) with
``prmt`` (16 per 8 codes, the table held as immediates, :func:`table_words`);
:func:`cached_lookup_asm` makes it once per (table, dtype).
"""
from typing import Dict, List, Sequence, Tuple

from .torch_support import require_torch

NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176636, 0.7229568362236023, 1.0)
"""bitsandbytes' NF4 code values."""

LOOKUP_PACK = 16
"""Packed bytes per :func:`lookup_asm` block."""


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


def lookup_asm(values: Sequence[float], dtype, pack: int = LOOKUP_PACK) -> str:
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


def asm_constraints(pack: int = LOOKUP_PACK) -> str:
    """The inline-asm constraint string that goes with :func:`lookup_asm`."""
    return ','.join(['=r'] * pack + ['r'] * (pack // 4))


_ASM_CACHE: Dict[tuple, str] = {}


def cached_lookup_asm(values, dtype) -> str:
    """:func:`lookup_asm` of ``values`` for ``dtype``, made once."""
    key = (values, str(dtype))
    if key not in _ASM_CACHE:
        _ASM_CACHE[key] = lookup_asm(values, dtype)
    return _ASM_CACHE[key]
