"""A compressed image's size as its header declares it, read without decoding.

The node refuses an oversized or unreadable compressed frame before any decoder sees it (a
decompression bomb costs nothing then): PNG, JPEG, WebP, BMP, GIF and TIFF headers are read
here; any other format is refused.
"""
from typing import Tuple


class ImageFormatError(ValueError):
    """An image message or file that cannot be turned into an RGB array."""


def _uint(data: bytes, start: int, size: int, order: str = 'little') -> int:
    if start + size > len(data):
        raise ImageFormatError('header cut off')
    return int.from_bytes(data[start:start + size], order)


def _png_size(data: bytes) -> Tuple[int, int]:
    if data[12:16] != b'IHDR':
        raise ImageFormatError('no IHDR chunk first')
    return _uint(data, 16, 4, 'big'), _uint(data, 20, 4, 'big')


_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> Tuple[int, int]:
    """(width, height) from a JPEG's frame header (the segments before it are skipped)."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7):
            position += 2
            continue
        if marker in _JPEG_SOF_MARKERS:
            return _uint(data, position + 7, 2, 'big'), _uint(data, position + 5, 2, 'big')
        position += 2 + _uint(data, position + 2, 2, 'big')
    raise ImageFormatError('no frame header (SOF) before the image data')


def _webp_size(data: bytes) -> Tuple[int, int]:
    """The canvas of an extended WebP (every frame lies inside it), else the one frame's."""
    chunk = data[12:16]
    if chunk == b'VP8X':
        return _uint(data, 24, 3) + 1, _uint(data, 27, 3) + 1
    if chunk == b'VP8L':
        if _uint(data, 20, 1) != 0x2F:
            raise ImageFormatError('bad lossless signature')
        bits = _uint(data, 21, 4)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b'VP8 ':
        if data[23:26] != b'\x9d\x01\x2a':
            raise ImageFormatError('bad lossy start code')
        return _uint(data, 26, 2) & 0x3FFF, _uint(data, 28, 2) & 0x3FFF
    raise ImageFormatError(f'unknown first chunk {chunk!r}')


def _bmp_size(data: bytes) -> Tuple[int, int]:
    if _uint(data, 14, 4) == 12:  # OS/2 core header: 16-bit sizes
        return _uint(data, 18, 2), _uint(data, 20, 2)
    _uint(data, 22, 4)  # the header is long enough
    width = int.from_bytes(data[18:22], 'little', signed=True)
    height = int.from_bytes(data[22:26], 'little', signed=True)  # negative: top-down rows
    return abs(width), abs(height)


def _gif_size(data: bytes) -> Tuple[int, int]:
    """The logical screen (OpenCV refuses frames outside it)."""
    return _uint(data, 6, 2), _uint(data, 8, 2)


def _tiff_size(data: bytes) -> Tuple[int, int]:
    """From the first directory (the page OpenCV reads): the image, and its tiles or strips
    must not be larger than ``max_pixels`` either (the decoder allocates one)."""
    order = 'little' if data[:2] == b'II' else 'big'
    directory = _uint(data, 4, 4, order)
    tags = {}
    for index in range(_uint(data, directory, 2, order)):
        entry = directory + 2 + 12 * index
        tag, kind = _uint(data, entry, 2, order), _uint(data, entry + 2, 2, order)
        if tag in (256, 257, 278, 322, 323):  # width, length, rows per strip, tile w/h
            tags[tag] = _uint(data, entry + 8, 2 if kind == 3 else 4, order)
    if 256 not in tags or 257 not in tags:
        raise ImageFormatError('no ImageWidth/ImageLength in the first directory')
    width, height = tags[256], tags[257]
    tile = (tags.get(322, 0), tags.get(323, 0))
    if tile[0] * tile[1] > width * height:
        width, height = tile  # checked as the larger allocation
    return width, height


_HEADERS = (
    ('PNG', (b'\x89PNG\r\n\x1a\n',), _png_size),
    ('JPEG', (b'\xff\xd8',), _jpeg_size),
    ('WebP', (b'RIFF',), _webp_size),
    ('BMP', (b'BM',), _bmp_size),
    ('GIF', (b'GIF87a', b'GIF89a'), _gif_size),
    ('TIFF', (b'II*\x00', b'MM\x00*'), _tiff_size),
)
COMPRESSED_FORMATS = tuple(name for name, _, _ in _HEADERS)
"""Compressed formats accepted: those whose declared size is read before decoding. Others
(JPEG 2000, AVIF, OpenEXR, HDR, PNM, BigTIFF, ...) are refused without decoding."""


def declared_size(data) -> Tuple[str, int, int]:
    """``(format, width, height)`` as a compressed image's header declares them, read
    without decoding (``data``: bytes or a memoryview of them); :class:`ImageFormatError` for
    data of any other format."""
    for name, magics, read in _HEADERS:
        if bytes(data[:8]).startswith(magics) and (name != 'WebP' or data[8:12] == b'WEBP'):
            try:
                width, height = read(data)
            except ImageFormatError as error:
                raise ImageFormatError(f'its {name} header cannot be read ({error})') from None
            return name, width, height
    raise ImageFormatError(f'not {", ".join(COMPRESSED_FORMATS[:-1])} or '
                           f'{COMPRESSED_FORMATS[-1]}, the formats whose size is checked before '
                           'decoding')
