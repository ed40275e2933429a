"""Tiny compressed images that declare (and decode to) huge ones, for the size checks."""
import struct


def lossless_webp(width: int, height: int) -> bytes:
    """A valid lossless WebP of ``width`` x ``height`` black pixels in about 50 bytes.

    Every prefix code has a single symbol, so each pixel takes zero bits: a decoder that
    trusts the header allocates and fills the whole image (16383 x 16383: 1.8 GB, seconds).
    """
    bits = []

    def put(value, count):
        bits.extend((value >> index) & 1 for index in range(count))

    put(width - 1, 14)
    put(height - 1, 14)
    put(0, 1)  # no alpha
    put(0, 3)  # version 0
    put(0, 1)  # no transform
    put(0, 1)  # no colour cache
    put(0, 1)  # no meta prefix codes
    for _ in range(5):  # green, red, blue, alpha, distance: a simple code of symbol 0
        put(1, 1)
        put(0, 1)
        put(0, 1)
        put(0, 1)
    packed = bytes(sum(bit << index for index, bit in enumerate(bits[start:start + 8]))
                   for start in range(0, len(bits), 8))
    body = (b'\x2f' + packed).ljust(32, b'\0')  # OpenCV wants 32 bytes at least
    chunk = b'VP8L' + struct.pack('<I', len(body)) + body
    return b'RIFF' + struct.pack('<I', 4 + len(chunk)) + b'WEBP' + chunk
