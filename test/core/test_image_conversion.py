"""Tests for qwen_vl_perception.image_conversion (no ROS needed; one test uses sensor_msgs
when it is importable)."""
import array
import sys
import types
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from qwen_vl_perception import image_conversion
from qwen_vl_perception.image_conversion import (
    SUPPORTED_ENCODINGS, ImageFormatError, compressed_msg_to_rgb, have_cv_bridge,
    image_msg_to_rgb, load_image_file, rgb_to_image_fields, save_rgb)

HEIGHT, WIDTH = 5, 6


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def rgb(rng):
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def make_msg(raw: np.ndarray, encoding: str, padding: int = 0, bigendian: bool = False,
             data_type=bytes):
    """An Image look-alike holding ``raw`` (H, W[, C]) with ``padding`` junk bytes per row."""
    height, width = raw.shape[:2]
    if raw.dtype == np.uint16:
        raw = raw.astype('>u2' if bigendian else '<u2')
    rows = raw.reshape(height, -1).view(np.uint8).reshape(height, -1)
    junk = np.full((height, padding), 0xEE, dtype=np.uint8)
    padded = np.concatenate([rows, junk], axis=1)
    return SimpleNamespace(height=height, width=width, encoding=encoding,
                           is_bigendian=int(bigendian), step=padded.shape[1],
                           data=data_type(padded.tobytes()))


def sixteen_bit(eight_bit: np.ndarray, rng) -> np.ndarray:
    """16-bit values whose high byte is ``eight_bit`` and whose low byte is noise."""
    low = rng.integers(0, 256, size=eight_bit.shape, dtype=np.uint16)
    return (eight_bit.astype(np.uint16) << 8) | low


def raw_and_expected(encoding: str, rgb: np.ndarray, rng):
    """Raw pixels for ``encoding`` built independently of the module, and the RGB result."""
    alpha = rng.integers(0, 256, size=rgb.shape[:2] + (1,), dtype=np.uint8)
    gray = rgb[:, :, 0]
    gray_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    bgr = rgb[:, :, ::-1]
    eight_bit = {
        'rgb': (rgb, rgb), 'bgr': (bgr, rgb),
        'rgba': (np.concatenate([rgb, alpha], axis=2), rgb),
        'bgra': (np.concatenate([bgr, alpha], axis=2), rgb),
        'mono': (gray, gray_rgb),
    }
    generic = {'8UC1': 'mono8', '8UC3': 'bgr8', '8UC4': 'bgra8', '16UC1': 'mono16'}
    name = generic.get(encoding, encoding)
    base, bits = name.rstrip('0123456789'), name[len(name.rstrip('0123456789')):]
    raw, expected = eight_bit[base]
    if bits == '16':
        raw = sixteen_bit(raw, rng)
    return np.ascontiguousarray(raw), expected


PLAIN_ENCODINGS = ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'rgb16', 'bgr16', 'rgba16',
                   'bgra16', 'mono16', '8UC1', '8UC3', '8UC4', '16UC1']


@pytest.mark.parametrize('encoding', PLAIN_ENCODINGS)
@pytest.mark.parametrize('padding', [0, 7])
@pytest.mark.parametrize('bigendian', [False, True])
def test_plain_encodings_convert_exactly(encoding, padding, bigendian, rgb, rng):
    raw, expected = raw_and_expected(encoding, rgb, rng)
    msg = make_msg(raw, encoding, padding=padding, bigendian=bigendian)
    result = image_msg_to_rgb(msg)
    assert result.dtype == np.uint8 and result.shape == (HEIGHT, WIDTH, 3)
    assert result.flags.c_contiguous and result.flags.writeable
    np.testing.assert_array_equal(result, expected)


def test_supported_encodings_cover_the_brief():
    required = {'rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', '8UC1', '8UC3', '16UC1',
                'yuv422', 'uyvy', 'yuv422_yuy2', 'yuyv'}
    assert required <= SUPPORTED_ENCODINGS


def test_mono16_uses_fixed_high_byte_rule_not_per_frame_scaling():
    dim = np.full((2, 2), 0x0400, dtype=np.uint16)  # a dark frame stays dark
    bright = np.array([[0x0000, 0xFFFF], [0x80FF, 0x7F00]], dtype=np.uint16)
    assert (image_msg_to_rgb(make_msg(dim, 'mono16')) == 4).all()
    np.testing.assert_array_equal(image_msg_to_rgb(make_msg(bright, 'mono16'))[:, :, 1],
                                  [[0, 255], [128, 127]])


def test_big_endian_flag_changes_byte_order():
    value = np.array([[0x1234]], dtype=np.uint16)
    little = make_msg(value, 'mono16', bigendian=False)
    big = make_msg(value, 'mono16', bigendian=True)
    assert little.data != big.data
    assert image_msg_to_rgb(little)[0, 0, 0] == 0x12
    assert image_msg_to_rgb(big)[0, 0, 0] == 0x12
    little.is_bigendian = 1  # the same bytes read the other way round
    assert image_msg_to_rgb(little)[0, 0, 0] == 0x34


def yuv_to_rgb_bt601(y, u, v):
    """The limited-range BT.601 formula (what OpenCV's YUV422 conversions implement)."""
    y, u, v = (np.asarray(c, dtype=np.float64) for c in (y, u, v))
    c, d, e = y - 16, u - 128, v - 128
    rgb = np.stack([1.164 * c + 1.596 * e, 1.164 * c - 0.392 * d - 0.813 * e,
                    1.164 * c + 2.017 * d], axis=-1)
    return np.clip(np.round(rgb), 0, 255)


@pytest.mark.parametrize('encoding,order', [('yuv422', 'uyvy'), ('uyvy', 'uyvy'),
                                            ('yuv422_yuy2', 'yuyv'), ('yuyv', 'yuyv')])
def test_yuv422_layouts(encoding, order, rng):
    height, width = 4, 8
    y = rng.integers(16, 236, size=(height, width), dtype=np.uint8)
    u = rng.integers(16, 241, size=(height, width // 2), dtype=np.uint8)
    v = rng.integers(16, 241, size=(height, width // 2), dtype=np.uint8)
    packed = np.empty((height, width // 2, 4), dtype=np.uint8)
    if order == 'uyvy':
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = u, y[:, 0::2], v, \
            y[:, 1::2]
    else:
        packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = y[:, 0::2], u, \
            y[:, 1::2], v
    msg = make_msg(packed.reshape(height, width, 2), encoding, padding=4)
    result = image_msg_to_rgb(msg)
    expected = yuv_to_rgb_bt601(y, np.repeat(u, 2, axis=1), np.repeat(v, 2, axis=1))
    assert np.abs(result.astype(int) - expected).max() <= 2


def test_yuv422_rejects_odd_width():
    msg = SimpleNamespace(height=2, width=3, encoding='yuv422', is_bigendian=0, step=6,
                          data=bytes(12))
    with pytest.raises(ImageFormatError, match='even width'):
        image_msg_to_rgb(msg)


BAYER_OFFSETS = {  # colour index at (row 0, col 0), (0, 1), (1, 0), (1, 1)
    'rggb': (0, 1, 1, 2), 'bggr': (2, 1, 1, 0), 'gbrg': (1, 2, 0, 1), 'grbg': (1, 0, 2, 1)}


@pytest.mark.parametrize('pattern', sorted(BAYER_OFFSETS))
@pytest.mark.parametrize('bits', ['8', '16'])
def test_bayer_patterns_demosaic_a_uniform_colour(pattern, bits, rng):
    color = np.array([200, 120, 40], dtype=np.uint8)
    mosaic = np.empty((8, 8), dtype=np.uint8)
    for index, (row, col) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        mosaic[row::2, col::2] = color[BAYER_OFFSETS[pattern][index]]
    if bits == '16':
        mosaic = sixteen_bit(mosaic, rng)
    result = image_msg_to_rgb(make_msg(mosaic, f'bayer_{pattern}{bits}', padding=3))
    assert (result[2:-2, 2:-2] == color).all()


@pytest.mark.parametrize('data_type', [
    bytes, bytearray, memoryview, lambda raw: array.array('B', raw), list,
    lambda raw: np.frombuffer(raw, dtype=np.uint8)])
def test_data_containers(data_type, rgb):
    msg = make_msg(rgb, 'rgb8', padding=2, data_type=data_type)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def test_result_does_not_share_memory_with_message(rgb):
    data = bytearray(rgb.tobytes())
    msg = SimpleNamespace(height=HEIGHT, width=WIDTH, encoding='rgb8', is_bigendian=0,
                          step=WIDTH * 3, data=data)
    result = image_msg_to_rgb(msg)
    result[:] = 0
    assert bytes(data) == rgb.tobytes()


def valid_msg(**changes):
    fields = dict(height=4, width=5, encoding='rgb8', is_bigendian=0, step=15, data=bytes(60))
    fields.update(changes)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize('changes,message', [
    (dict(height=0, data=b''), 'height must be > 0'),
    (dict(width=0), 'width must be > 0'),
    (dict(width=-5), 'width must be > 0'),
    (dict(height=None), 'height must be an integer'),
    (dict(width=5.0), 'width must be an integer'),
    (dict(encoding='32FC1'), "unsupported image encoding '32FC1'.*supported: .*rgb8"),
    (dict(encoding='RGB8'), "unsupported image encoding 'RGB8'"),
    (dict(encoding=None), 'unsupported image encoding None'),
    (dict(step=14, data=bytes(56)), r'step 14 is smaller than width 5 x 3 bytes per pixel'),
    (dict(encoding='rgba8'), r'step 15 is smaller than width 5 x 4 bytes per pixel'),
    (dict(step='15'), 'step must be an integer'),
    (dict(data=bytes(59)), r'59 bytes, expected height 4 x step 15 = 60'),
    (dict(data=bytes(61)), r'61 bytes, expected height 4 x step 15 = 60'),
    (dict(data=None), 'must be bytes-like'),
    (dict(data='x' * 60), 'must be bytes-like'),
    (dict(data=[0] * 59 + [256]), '0..255'),
    (dict(data=[0] * 59 + [-1]), '0..255'),
    (dict(data=np.full(60, 300, dtype=np.int32)), '0..255'),
])
def test_rejections_have_useful_messages(changes, message):
    with pytest.raises(ImageFormatError, match=message):
        image_msg_to_rgb(valid_msg(**changes))


def test_missing_attributes_are_rejected():
    with pytest.raises(ImageFormatError, match='height'):
        image_msg_to_rgb(object())


def test_max_pixels_is_checked_before_the_data():
    assert image_msg_to_rgb(valid_msg(), max_pixels=20).shape == (4, 5, 3)
    huge = valid_msg(height=100000, width=100000, step=300000, data=b'')
    with pytest.raises(ImageFormatError, match='5x4 = 20 pixels exceeds the limit of 19 pixels'):
        image_msg_to_rgb(valid_msg(), max_pixels=19)
    with pytest.raises(ImageFormatError, match='exceeds the limit'):
        image_msg_to_rgb(huge, max_pixels=4096 * 4096)


def test_image_format_error_is_a_value_error():
    assert issubclass(ImageFormatError, ValueError)


# ------------------------------------------------------------------------- cv_bridge

def test_cv_bridge_is_absent_here_and_the_fallback_converts(rgb):
    assert have_cv_bridge() is False
    msg = make_msg(rgb[:, :, ::-1], 'bgr8', padding=1)
    np.testing.assert_array_equal(image_msg_to_rgb(msg, use_cv_bridge=True), rgb)


@pytest.fixture
def stand_in_cv_bridge(monkeypatch):
    """A minimal cv_bridge module that records calls (stands in for ROS's package)."""
    calls = []

    class CvBridge:
        def imgmsg_to_cv2(self, msg, desired_encoding='passthrough'):
            calls.append(desired_encoding)
            return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)

    module = types.ModuleType('cv_bridge')
    module.CvBridge = CvBridge
    monkeypatch.setitem(sys.modules, 'cv_bridge', module)
    image_conversion.forget_cv_bridge()
    yield calls
    image_conversion.forget_cv_bridge()


def test_cv_bridge_is_used_only_after_validation(stand_in_cv_bridge, rgb):
    assert have_cv_bridge()
    with pytest.raises(ImageFormatError, match='expected height'):
        image_msg_to_rgb(valid_msg(data=bytes(10)), use_cv_bridge=True)
    assert stand_in_cv_bridge == []
    msg = make_msg(rgb, 'rgb8')
    result = image_msg_to_rgb(msg, use_cv_bridge=True)
    assert stand_in_cv_bridge == ['rgb8']
    np.testing.assert_array_equal(result, rgb)
    assert result.flags.writeable  # a copy, even though the bridge returned a read-only view
    image_msg_to_rgb(msg)  # not asked for: the bridge is not used
    assert stand_in_cv_bridge == ['rgb8']


# -------------------------------------------------------------------- building images

@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8'])
def test_rgb_to_image_fields_round_trips(encoding, rgb):
    fields = rgb_to_image_fields(rgb, encoding)
    assert fields['height'] == HEIGHT and fields['width'] == WIDTH
    assert fields['step'] == WIDTH * 3 and fields['is_bigendian'] == 0
    assert fields['encoding'] == encoding and isinstance(fields['data'], bytes)
    np.testing.assert_array_equal(image_msg_to_rgb(SimpleNamespace(**fields)), rgb)
    if encoding == 'bgr8':
        assert fields['data'][:3] == bytes(rgb[0, 0, ::-1])


def test_rgb_to_image_fields_rejects_bad_input(rgb):
    with pytest.raises(ImageFormatError, match='cannot write encoding'):
        rgb_to_image_fields(rgb, 'mono8')
    with pytest.raises(ImageFormatError, match=r'\(H, W, 3\) uint8'):
        rgb_to_image_fields(rgb.astype(np.float32))
    with pytest.raises(ImageFormatError, match=r'\(H, W, 3\) uint8'):
        rgb_to_image_fields(rgb[:, :, 0])


def test_real_sensor_msgs_image_round_trips(rgb):
    sensor_msgs = pytest.importorskip('sensor_msgs.msg')
    msg = sensor_msgs.Image(**rgb_to_image_fields(rgb, 'bgr8'))
    assert isinstance(msg.data, array.array)  # what rclpy hands a subscriber
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


# -------------------------------------------------------------------- compressed images

def compressed(image: np.ndarray, extension: str, image_format: str):
    ok, encoded = cv2.imencode(extension, image)
    assert ok
    return SimpleNamespace(format=image_format, data=encoded.tobytes())


@pytest.mark.parametrize('image_format', ['png', 'bgr8; png compressed bgr8'])
def test_png_decodes_exactly(image_format, rgb):
    msg = compressed(rgb[:, :, ::-1], '.png', image_format)
    msg.data = array.array('B', msg.data)
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg), rgb)


@pytest.mark.parametrize('image_format', ['jpeg', 'rgb8; jpeg compressed bgr8'])
def test_jpeg_decodes_with_correct_colours(image_format):
    rgb = np.zeros((32, 48, 3), dtype=np.uint8)
    rgb[:, :24] = (220, 30, 30)  # red left half, blue right half
    rgb[:, 24:] = (30, 30, 220)
    result = compressed_msg_to_rgb(compressed(rgb[:, :, ::-1], '.jpg', image_format))
    assert result.shape == rgb.shape
    assert np.abs(result.astype(int) - rgb).mean() < 4


def test_gray_rgba_and_16_bit_pngs(rgb, rng):
    gray = rgb[:, :, 1]
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed(gray, '.png', 'png')),
                                  np.repeat(gray[:, :, None], 3, axis=2))
    bgra = np.concatenate([rgb[:, :, ::-1], np.zeros_like(rgb[:, :, :1])], axis=2)
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed(bgra, '.png', 'png')), rgb)
    deep = sixteen_bit(gray, rng)
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed(deep, '.png', 'png'))[..., 0],
                                  gray)


@pytest.mark.parametrize('data,message', [
    (b'', 'is empty'),
    (b'this is not an image at all', 'not an image'),
    (b'\xff\xd8\xff\xe0' + bytes(100), 'not an image'),
    (None, 'bytes-like'),
])
def test_garbage_compressed_data_is_rejected(data, message):
    with pytest.raises(ImageFormatError, match=message):
        compressed_msg_to_rgb(SimpleNamespace(format='jpeg', data=data))


def test_compressed_depth_is_rejected():
    with pytest.raises(ImageFormatError, match='compressedDepth'):
        compressed_msg_to_rgb(SimpleNamespace(format='16UC1; compressedDepth png',
                                              data=bytes(100)))


@pytest.mark.parametrize('extension', ['.png', '.jpg'])
def test_compressed_max_pixels_is_checked_from_the_header(extension):
    big = np.zeros((300, 400, 3), dtype=np.uint8)
    msg = compressed(big, extension, extension[1:])
    assert compressed_msg_to_rgb(msg, max_pixels=120000).shape == (300, 400, 3)
    with pytest.raises(ImageFormatError, match='400x300 = 120000 pixels exceeds'):
        compressed_msg_to_rgb(msg, max_pixels=119999)
    # A truncated file is refused for its size before any decoding is attempted.
    msg.data = msg.data[:200]
    with pytest.raises(ImageFormatError, match='400x300 = 120000 pixels exceeds'):
        compressed_msg_to_rgb(msg, max_pixels=1000)


# ------------------------------------------------------------------------------ files

def test_save_and_load_round_trip_with_unicode_path(tmp_path, rgb):
    path = tmp_path / 'nested' / 'dir' / 'bild_ä.png'
    assert save_rgb(path, rgb) == str(path)
    loaded = load_image_file(path)
    np.testing.assert_array_equal(loaded, rgb)
    assert loaded.flags.c_contiguous and loaded.flags.writeable
    # The file is a normal PNG in standard colour order.
    np.testing.assert_array_equal(cv2.imdecode(np.fromfile(str(path), np.uint8), 1),
                                  rgb[:, :, ::-1])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no image file'):
        load_image_file(tmp_path / 'missing.png')
    garbage = tmp_path / 'garbage.jpg'
    garbage.write_bytes(b'not a picture')
    with pytest.raises(ImageFormatError, match='garbage.jpg is not an image'):
        load_image_file(garbage)
    with pytest.raises(FileNotFoundError):
        load_image_file(tmp_path)  # a folder


def test_save_errors(tmp_path, rgb):
    with pytest.raises(ImageFormatError, match='no file extension'):
        save_rgb(tmp_path / 'noext', rgb)
    with pytest.raises(ImageFormatError, match='.xyz'):
        save_rgb(tmp_path / 'image.xyz', rgb)
    with pytest.raises(ImageFormatError, match=r'\(H, W, 3\)'):
        save_rgb(tmp_path / 'image.png', rgb[:, :, :2])


def _encoded(extension, image, *params):
    ok, encoded = cv2.imencode(extension, image, list(params))
    assert ok
    return encoded.tobytes()


@pytest.mark.parametrize('name,data', [
    ('PNG', lambda image: _encoded('.png', image)),
    ('JPEG', lambda image: _encoded('.jpg', image)),
    ('JPEG', lambda image: _encoded('.jpg', image, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    ('WebP', lambda image: _encoded('.webp', image, cv2.IMWRITE_WEBP_QUALITY, 80)),  # VP8
    ('WebP', lambda image: _encoded('.webp', image, cv2.IMWRITE_WEBP_QUALITY, 101)),  # VP8L
    ('WebP', lambda image: _encoded('.webp', np.dstack([image, image[:, :, :1]]),
                                    cv2.IMWRITE_WEBP_QUALITY, 80)),  # VP8X (alpha)
    ('BMP', lambda image: _encoded('.bmp', image)),
    ('GIF', lambda image: _encoded('.gif', image)),
    ('TIFF', lambda image: _encoded('.tiff', image)),
    ('TIFF', lambda image: _encoded('.tiff', image, cv2.IMWRITE_TIFF_COMPRESSION, 1)),
])
def test_every_accepted_format_is_size_checked_before_decoding(name, data, rgb):
    image = np.ascontiguousarray(np.tile(rgb, (5, 7, 1))[:23, :37])
    encoded = data(image)
    assert image_conversion.declared_size(encoded) == (name, 37, 23)
    msg = SimpleNamespace(format=name.lower(), data=encoded)
    assert compressed_msg_to_rgb(msg, max_pixels=37 * 23).shape == (23, 37, 3)
    with pytest.raises(ImageFormatError,
                       match=f'exceeds the limit of 850 pixels \\(declared in the {name} header'):
        compressed_msg_to_rgb(msg, max_pixels=850)


def test_a_decompression_bomb_is_refused_from_its_header():
    from image_bombs import lossless_webp
    small = lossless_webp(64, 48)  # the same construction decodes
    assert compressed_msg_to_rgb(SimpleNamespace(format='webp', data=small)).shape == \
        (48, 64, 3)
    bomb = SimpleNamespace(format='webp', data=lossless_webp(16383, 16383))
    with pytest.raises(ImageFormatError, match='16383x16383 = 268402689 pixels exceeds'):
        image_conversion.compressed_msg_decoder(bomb, max_pixels=4096 * 4096)


@pytest.mark.parametrize('extension', ['.jp2', '.ppm', '.pfm', '.hdr', '.sr'])
def test_formats_whose_size_is_not_read_first_are_refused(extension):
    image = np.full((32, 32, 3), 100, np.uint8)
    encoded = _encoded(extension, image.astype(np.float32) if extension in ('.pfm', '.hdr')
                       else image)
    assert cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    with pytest.raises(ImageFormatError, match='the formats whose size is checked before'):
        compressed_msg_to_rgb(SimpleNamespace(format='x', data=encoded))


@pytest.mark.parametrize('width,height,refused', [
    (4096, 1, True), (1, 201, True), (200, 1, False), (3, 600, False), (3, 601, True)])
def test_aspect_ratios_the_model_cannot_take_are_refused(width, height, refused):
    raw = valid_msg(width=width, height=height, step=width * 3, data=bytes(width * height * 3))
    png = SimpleNamespace(format='png',
                          data=_encoded('.png', np.zeros((height, width, 3), np.uint8)))
    for convert, message in ((image_msg_to_rgb, raw), (compressed_msg_to_rgb, png)):
        if refused:
            with pytest.raises(ImageFormatError, match='more than 200 times as'):
                convert(message)
        else:
            assert convert(message).shape == (height, width, 3)
