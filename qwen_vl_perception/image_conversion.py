"""Camera messages <-> RGB numpy arrays, without ROS.

Everything here is duck-typed: ``image_msg_to_rgb`` reads the attributes of a
``sensor_msgs/Image`` (``height``, ``width``, ``encoding``, ``step``, ``is_bigendian``,
``data``) and ``compressed_msg_to_rgb`` those of a ``sensor_msgs/CompressedImage``
(``format``, ``data``), so any object with the same attributes works (tests use
``types.SimpleNamespace``). Every result is a fresh, writable, C-contiguous ``(H, W, 3)``
``uint8`` RGB array that shares no memory with the message.

Messages are validated like C++ cv_bridge does (which the Python cv_bridge does not), and
more: size, encoding allow-list, ``step``, data length and an optional pixel cap. Every
rejection raises :class:`ImageFormatError` with a message that says what is wrong.

Fixed conversion rules (no per-frame normalisation, so brightness never jumps between
frames):

* 16-bit encodings keep their high byte (``value >> 8``); e.g. a 16UC1 depth image in
  millimetres therefore shows 0-255 mm as black.
* ``8UC1`` is read as ``mono8``, ``8UC3`` as ``bgr8``, ``8UC4`` as ``bgra8`` (OpenCV's channel
  order, the way cv_bridge's ``cv2_to_imgmsg`` produces them) and ``16UC1`` as ``mono16``.
* Alpha is dropped; mono is replicated into three channels.
* ``yuv422``/``uyvy`` and ``yuv422_yuy2``/``yuyv`` use OpenCV's BT.601 conversion; Bayer
  patterns use OpenCV's bilinear demosaicing.
"""
import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import cv2
import numpy as np

from .model.pixel_budget import MAX_ASPECT_RATIO
# Re-exported: the header check is part of this module's API.
from .image_headers import COMPRESSED_FORMATS, ImageFormatError, declared_size  # noqa: F401


def _high_byte(values: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit by the fixed rule ``value >> 8``."""
    return (values >> 8).astype(np.uint8)


def _cvt(code: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda pixels: cv2.cvtColor(np.ascontiguousarray(pixels), code)


def _mono_to_rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels, 3, axis=2)


def _reverse_first_three(pixels: np.ndarray) -> np.ndarray:
    return pixels[:, :, 2::-1]


def _first_three(pixels: np.ndarray) -> np.ndarray:
    return pixels[:, :, :3]


@dataclass(frozen=True)
class _Encoding:
    channels: int
    bytes_per_channel: int
    to_rgb: Callable[[np.ndarray], np.ndarray]
    """Maps ``(H, W, channels)`` 8-bit pixels (16-bit ones already reduced) to RGB."""
    even_width: bool = False

    @property
    def bytes_per_pixel(self) -> int:
        return self.channels * self.bytes_per_channel


def _build_encodings() -> Dict[str, _Encoding]:
    table = {}
    for depth_bytes, suffix in ((1, '8'), (2, '16')):
        table['rgb' + suffix] = _Encoding(3, depth_bytes, _first_three)
        table['bgr' + suffix] = _Encoding(3, depth_bytes, _reverse_first_three)
        table['rgba' + suffix] = _Encoding(4, depth_bytes, _first_three)
        table['bgra' + suffix] = _Encoding(4, depth_bytes, _reverse_first_three)
        table['mono' + suffix] = _Encoding(1, depth_bytes, _mono_to_rgb)
        # ROS names Bayer patterns by the top-left 2x2 block, OpenCV by the second row's
        # first two pixels: rggb is OpenCV's "BG" (the same mapping cv_bridge uses).
        for ros_pattern, cv_code in (('rggb', cv2.COLOR_BayerBG2RGB),
                                     ('bggr', cv2.COLOR_BayerRG2RGB),
                                     ('gbrg', cv2.COLOR_BayerGR2RGB),
                                     ('grbg', cv2.COLOR_BayerGB2RGB)):
            table['bayer_' + ros_pattern + suffix] = _Encoding(1, depth_bytes, _cvt(cv_code))
    table['8UC1'] = table['mono8']
    table['8UC3'] = table['bgr8']
    table['8UC4'] = table['bgra8']
    table['16UC1'] = table['mono16']
    uyvy = _Encoding(2, 1, _cvt(cv2.COLOR_YUV2RGB_UYVY), even_width=True)
    yuyv = _Encoding(2, 1, _cvt(cv2.COLOR_YUV2RGB_YUYV), even_width=True)
    table.update({'yuv422': uyvy, 'uyvy': uyvy, 'yuv422_yuy2': yuyv, 'yuyv': yuyv})
    return table


_ENCODINGS = _build_encodings()

SUPPORTED_ENCODINGS = frozenset(_ENCODINGS)
"""Encodings ``image_msg_to_rgb`` accepts (names as in ``sensor_msgs/image_encodings``)."""

_OUTPUT_ENCODINGS = ('rgb8', 'bgr8')


# ----------------------------------------------------------------------------- helpers

def _require_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ImageFormatError(f'image {name} must be an integer, got {value!r}')
    if value <= 0:
        raise ImageFormatError(f'image {name} must be > 0, got {value}')
    return int(value)


def _check_shape(width: int, height: int, max_pixels: Optional[int], where: str = '') -> None:
    """Refuse a size above ``max_pixels`` or of a more extreme aspect than the model takes."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageFormatError(
            f'image of {width}x{height} = {width * height} pixels exceeds the limit of '
            f'{max_pixels} pixels{where}')
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageFormatError(
            f'image of {width}x{height} is more than {MAX_ASPECT_RATIO} times as '
            f'{"wide as high" if width > height else "high as wide"}, which the model '
            f'cannot take{where}')


def _as_byte_array(data) -> np.ndarray:
    """Message data -> flat uint8 array without per-element Python work where possible.

    Accepts bytes, bytearray, memoryview, ``array.array`` (rclpy's ``uint8[]``), numpy arrays
    and sequences of ints 0-255 (e.g. a list).
    """
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8:
            return data.reshape(-1)
        if np.issubdtype(data.dtype, np.integer):
            if data.size and (data.min() < 0 or data.max() > 255):
                raise ImageFormatError('image data holds values outside 0..255')
            return data.astype(np.uint8).reshape(-1)
        raise ImageFormatError(f'image data has unsupported dtype {data.dtype}')
    if isinstance(data, (str, type(None))):
        raise ImageFormatError(f'image data must be bytes-like, got {type(data).__name__}')
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        pass
    try:
        return np.frombuffer(bytes(data), dtype=np.uint8)
    except (TypeError, ValueError) as error:
        raise ImageFormatError(
            f'image data must be bytes or a sequence of ints 0..255 ({error})') from None


def _fresh_rgb(pixels: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable uint8 copy that shares no memory with the message."""
    rgb = np.array(pixels, dtype=np.uint8, order='C', copy=True)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageFormatError(f'conversion produced shape {rgb.shape}, expected (H, W, 3)')
    return rgb


@functools.lru_cache(maxsize=1)
def _cv_bridge_instance():
    """A ``CvBridge`` when ROS's cv_bridge is importable, else None (imported lazily)."""
    try:
        from cv_bridge import CvBridge  # noqa: PLC0415 - optional, lazy on purpose
        return CvBridge()
    except Exception:  # ImportError, or a broken install (e.g. a numpy ABI mismatch)
        return None


def have_cv_bridge() -> bool:
    """Whether ROS's ``cv_bridge`` can be used by ``image_msg_to_rgb(use_cv_bridge=True)``."""
    return _cv_bridge_instance() is not None


def forget_cv_bridge() -> None:
    """Look for ``cv_bridge`` again at the next conversion (after the environment changed)."""
    _cv_bridge_instance.cache_clear()


# ----------------------------------------------------------------------- raw images

def image_msg_to_rgb(msg, max_pixels: Optional[int] = None,
                     use_cv_bridge: bool = False) -> np.ndarray:
    """A ``sensor_msgs/Image`` (or look-alike) -> ``(H, W, 3)`` uint8 RGB array.

    :param max_pixels: reject images with more than this many pixels (before reading data).
    :param use_cv_bridge: after this function's own validation, convert with ROS's
        ``CvBridge().imgmsg_to_cv2(msg, 'rgb8')`` when cv_bridge is importable; when it is
        not, the built-in conversion is used. (cv_bridge scales 16-bit data by 255/65535
        instead of ``>> 8``, so a few values may differ by one.)
    :raises ImageFormatError: for any message that is not a valid image of a supported
        encoding.
    """
    height = _require_positive_int('height', getattr(msg, 'height', None))
    width = _require_positive_int('width', getattr(msg, 'width', None))
    encoding = getattr(msg, 'encoding', None)
    spec = _ENCODINGS.get(encoding) if isinstance(encoding, str) else None
    if spec is None:
        raise ImageFormatError(
            f'unsupported image encoding {encoding!r}; supported: '
            f'{", ".join(sorted(SUPPORTED_ENCODINGS))}')
    _check_shape(width, height, max_pixels)
    if spec.even_width and width % 2:
        raise ImageFormatError(f'{encoding} images need an even width, got {width}')
    step = getattr(msg, 'step', None)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ImageFormatError(f'image step must be an integer, got {step!r}')
    row_bytes = width * spec.bytes_per_pixel
    if step < row_bytes:
        raise ImageFormatError(
            f'image step {step} is smaller than width {width} x {spec.bytes_per_pixel} bytes '
            f'per pixel ({encoding}) = {row_bytes}')
    data = _as_byte_array(getattr(msg, 'data', None))
    if data.size != height * step:
        raise ImageFormatError(
            f'image data has {data.size} bytes, expected height {height} x step {step} = '
            f'{height * step}')

    if use_cv_bridge:
        bridge = _cv_bridge_instance()
        if bridge is not None:
            try:
                converted = bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8')
            except Exception as error:  # cv_bridge raises its own CvBridgeError and others
                raise ImageFormatError(f'cv_bridge could not convert the image: {error}') \
                    from error
            return _fresh_rgb(converted)

    dtype = np.dtype(np.uint8)
    if spec.bytes_per_channel == 2:
        dtype = np.dtype('>u2' if getattr(msg, 'is_bigendian', 0) else '<u2')
    # A strided view over the rows skips any padding at the end of each row without a copy.
    pixels = np.ndarray(shape=(height, width, spec.channels), dtype=dtype, buffer=data,
                        strides=(step, spec.bytes_per_pixel, spec.bytes_per_channel))
    if spec.bytes_per_channel == 2:
        pixels = _high_byte(pixels)
    return _fresh_rgb(spec.to_rgb(pixels))


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = 'rgb8') -> dict:
    """The fields of a ``sensor_msgs/Image`` holding ``rgb`` (for the annotated image).

    Returns ``dict(height, width, encoding, is_bigendian, step, data)`` with ``data`` as
    ``bytes``; ``encoding`` is ``'rgb8'`` or ``'bgr8'``. Set the header separately.
    """
    if encoding not in _OUTPUT_ENCODINGS:
        raise ImageFormatError(
            f'cannot write encoding {encoding!r}; choose one of {", ".join(_OUTPUT_ENCODINGS)}')
    rgb = _require_rgb(rgb)
    pixels = rgb if encoding == 'rgb8' else rgb[:, :, ::-1]
    height, width = rgb.shape[:2]
    return {'height': height, 'width': width, 'encoding': encoding, 'is_bigendian': 0,
            'step': width * 3, 'data': np.ascontiguousarray(pixels).tobytes()}


def _require_rgb(rgb) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
            or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        description = (f'{rgb.dtype} array of shape {rgb.shape}'
                       if isinstance(rgb, np.ndarray) else type(rgb).__name__)
        raise ImageFormatError(f'expected a non-empty (H, W, 3) uint8 RGB array, got '
                               f'{description}')
    return rgb


# ----------------------------------------------------------------- compressed images

def _decoded_to_rgb(decoded: np.ndarray) -> np.ndarray:
    """cv2.imdecode(..., IMREAD_UNCHANGED) output (BGR order) -> RGB uint8."""
    if decoded.dtype == np.uint16:
        decoded = _high_byte(decoded)
    elif decoded.dtype != np.uint8:
        raise ImageFormatError(f'decoded image has unsupported depth {decoded.dtype}')
    if decoded.ndim == 2:
        return cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB)
    channels = decoded.shape[2]
    if channels == 1:
        return cv2.cvtColor(decoded[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    raise ImageFormatError(f'decoded image has unsupported channel count {channels}')


def check_compressed(encoded: np.ndarray, max_pixels: Optional[int], what: str) -> None:
    """Refuse, before any decoding, compressed data whose header declares a size that
    :func:`_check_shape` refuses, or whose size cannot be read (see :data:`COMPRESSED_FORMATS`).
    """
    if encoded.size == 0:
        raise ImageFormatError(f'{what} is empty')
    data = memoryview(np.ascontiguousarray(encoded))  # the header is read in place, uncopied
    try:
        name, width, height = declared_size(data)
    except ImageFormatError as error:
        raise ImageFormatError(f'{what} is not an image to decode: {error} '
                               f'({encoded.size} bytes, starting {bytes(data[:8])!r})') from None
    if width <= 0 or height <= 0:
        raise ImageFormatError(f'{what} is not an image: its {name} header declares '
                               f'{width}x{height}')
    _check_shape(width, height, max_pixels, f' (declared in the {name} header)')


def _decode(encoded: np.ndarray, max_pixels: Optional[int], what: str) -> np.ndarray:
    check_compressed(encoded, max_pixels, what)
    return _decode_checked(encoded, max_pixels, what)


def _decode_checked(encoded: np.ndarray, max_pixels: Optional[int], what: str) -> np.ndarray:
    """Decode data whose header :func:`check_compressed` has passed."""
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if decoded is None or decoded.size == 0:
        raise ImageFormatError(f'{what} is not an image OpenCV can decode '
                               f'({encoded.size} bytes, starting {encoded[:8].tobytes()!r})')
    _check_shape(decoded.shape[1], decoded.shape[0], max_pixels)
    return _fresh_rgb(_decoded_to_rgb(decoded))


def compressed_msg_decoder(msg, max_pixels: Optional[int] = None
                           ) -> Callable[[], np.ndarray]:
    """Check a ``sensor_msgs/CompressedImage`` (or look-alike) now, decode it later: returns a
    function that decodes it (what :func:`compressed_msg_to_rgb` returns). Everything that
    needs no decoding is checked here, the size its header declares included, so that a
    camera callback can refuse a bad or oversized image at once and leave the decoding, which
    can take a while, to another thread. The function raises :class:`ImageFormatError` for
    data that does not decode (or decodes to another size than declared)."""
    image_format = getattr(msg, 'format', '') or ''
    if not isinstance(image_format, str):
        raise ImageFormatError(f'compressed image format must be a string, got '
                               f'{image_format!r}')
    if 'compresseddepth' in image_format.lower():
        raise ImageFormatError(f'compressedDepth images ({image_format!r}) are depth maps, '
                               'not camera images; subscribe to the colour image instead')
    encoded = _as_byte_array(getattr(msg, 'data', None))
    what = f'compressed image data (format {image_format!r})'
    check_compressed(encoded, max_pixels, what)
    return functools.partial(_decode_checked, encoded, max_pixels, what)


def compressed_msg_to_rgb(msg, max_pixels: Optional[int] = None) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (or look-alike) -> ``(H, W, 3)`` uint8 RGB array.

    ``msg.format`` is informative ("jpeg", "png", "rgb8; jpeg compressed bgr8", ...): OpenCV
    recognises the data itself. The colours of a JPEG/PNG are stored in the usual way whatever
    the source encoding was, so no channel swap depends on the format. 16-bit PNGs keep their
    high byte. ``compressedDepth`` messages (depth maps with a private header) are rejected,
    and so is any format whose size cannot be read before decoding
    (:data:`COMPRESSED_FORMATS`).
    """
    return compressed_msg_decoder(msg, max_pixels)()


# ------------------------------------------------------------------------------ files

def load_image_file(path, max_pixels: Optional[int] = None) -> np.ndarray:
    """Read an image file (any format OpenCV reads) as an ``(H, W, 3)`` uint8 RGB array.

    Pixels are taken in stored order (EXIF orientation is ignored), as camera messages and
    PIL without ``exif_transpose`` see them, so boxes annotated on the stored pixels match.
    Works for non-ASCII paths. Raises ``FileNotFoundError`` for a missing file and
    :class:`ImageFormatError` for one that is not a readable image.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no image file at {path}')
    try:
        encoded = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageFormatError(f'cannot read {path}: {error}') from error
    return _decode(encoded, max_pixels, f'file {path}')


def save_rgb(path, rgb: np.ndarray) -> str:
    """Write an RGB array to ``path``; the format follows the extension (.png, .jpg, ...).

    Creates missing parent folders, works for non-ASCII paths and returns the path.
    """
    rgb = _require_rgb(rgb)
    path = os.fspath(path)
    extension = os.path.splitext(path)[1]
    if not extension:
        raise ImageFormatError(f'cannot tell the image format of {path}: no file extension')
    try:
        ok, encoded = cv2.imencode(extension, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error as error:
        raise ImageFormatError(f'cannot encode an image as {extension!r}: {error}') from None
    if not ok:
        raise ImageFormatError(f'OpenCV failed to encode an image as {extension!r}')
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    encoded.tofile(path)
    return path
