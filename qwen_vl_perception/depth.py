"""3D positions of 2D detections from a depth image registered to the colour camera (no ROS).

A depth image is *registered* when its pixel (u, v) sees what the colour image's pixel (u, v)
sees (RealSense ``aligned_depth_to_color``, ZED, OAK-D with depth aligned to RGB): then one
pinhole model, the colour camera's intrinsics, maps every box to 3D.

For each detection:

1. **Depth**: the valid pixels (finite, > 0; a 16UC1 0 means "no reading") of the box's
   central part (``central_fraction`` of its width and height, default 0.6: a box's corners
   are mostly background). The nearest surface there is the 10th percentile (up to a tenth of
   the pixels may be closer noise or an occluding edge); the object's depth is the median of
   the valid pixels within 5% (at least 2 cm) of it. The median over that band is robust to
   noise, and a ring or a cone, whose central part shows the background through a hole or
   beside a slope, is still measured on itself. Fewer than ``MIN_VALID_PIXELS`` valid pixels:
   no depth, and no 3D for that object (counted by the caller).
2. **Position**: the box centre deprojected at that depth, ``x = (u - cx) z / fx``,
   ``y = (v - cy) z / fy`` in the optical frame (x right, y down, z forward). Boxes are in
   continuous pixel coordinates (the pixel in column 0 spans 0..1), intrinsics in ROS's
   convention (pixel centres at integers), so ``u = box centre - 0.5``.
3. **Size**: width and height of the box at that depth; the extent along the viewing ray
   cannot be seen from one view: the smaller of the two is used.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .detection import Box, Detection

DEPTH_ENCODINGS = {'16UC1': ('u2', 0.001), 'mono16': ('u2', 0.001), '32FC1': ('f4', 1.0)}
"""Depth image encodings (REP 118): 16-bit unsigned millimetres, or 32-bit float metres."""

CENTRAL_FRACTION = 0.6
NEAR_PERCENTILE = 10.0
SURFACE_BAND = 0.05
SURFACE_BAND_MIN_M = 0.02
MIN_VALID_PIXELS = 10


class DepthFormatError(ValueError):
    """A depth image or camera model that cannot be used; the message says why."""


@dataclass(frozen=True)
class Intrinsics:
    """A pinhole camera: focal lengths and principal point in pixels, for an image of
    ``width`` x ``height``."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_k(cls, k: Sequence[float], width: int, height: int) -> 'Intrinsics':
        """From a row-major 3x3 camera matrix (``sensor_msgs/CameraInfo.k``)."""
        values = [float(value) for value in k]
        if len(values) != 9:
            raise DepthFormatError(f'a camera matrix has 9 entries, got {len(values)}')
        fx, fy, cx, cy = values[0], values[4], values[2], values[5]
        if not all(np.isfinite([fx, fy, cx, cy])) or fx <= 0.0 or fy <= 0.0:
            raise DepthFormatError(f'camera matrix without positive focal lengths: {values}')
        return cls(fx, fy, cx, cy, int(width), int(height))

    def deproject(self, u: float, v: float, z: float) -> Tuple[float, float, float]:
        """The point at depth ``z`` seen at pixel (``u``, ``v``) (ROS pixel convention)."""
        return (u - self.cx) * z / self.fx, (v - self.cy) * z / self.fy, z


@dataclass
class Located:
    """A detection placed in 3D: ``position`` (x, y, z) and ``size`` in metres, in the
    optical frame of the camera."""

    detection: Detection
    position: Tuple[float, float, float]
    size: Tuple[float, float, float]


def depth_msg_to_meters(msg) -> np.ndarray:
    """A ``sensor_msgs/Image`` depth message (or look-alike) -> ``(H, W)`` float32 metres, with
    NaN where there is no reading (0, NaN, infinite or negative values).

    :raises DepthFormatError: for a wrong encoding, size, step or data length.
    """
    encoding = getattr(msg, 'encoding', None)
    if encoding not in DEPTH_ENCODINGS:
        raise DepthFormatError(f'depth encoding {encoding!r} is not one of '
                               f'{", ".join(DEPTH_ENCODINGS)} (millimetres or metres)')
    kind, scale = DEPTH_ENCODINGS[encoding]
    height, width, step = (getattr(msg, name, None) for name in ('height', 'width', 'step'))
    for name, value in (('height', height), ('width', width), ('step', step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise DepthFormatError(f'depth image {name} must be a positive integer, '
                                   f'got {value!r}')
    dtype = np.dtype(('>' if getattr(msg, 'is_bigendian', 0) else '<') + kind)
    if step < width * dtype.itemsize:
        raise DepthFormatError(f'depth image step {step} is smaller than width {width} x '
                               f'{dtype.itemsize} bytes')
    try:  # bytes, array.array (rclpy's uint8[]), memoryview: no copy
        data = np.frombuffer(msg.data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if data.size != height * step:
        raise DepthFormatError(f'depth image data has {data.size} bytes, expected height '
                               f'{height} x step {step} = {height * step}')
    values = np.ndarray((height, width), dtype=dtype, buffer=data,
                        strides=(step, dtype.itemsize))
    meters = values.astype(np.float32) * np.float32(scale)
    meters[~np.isfinite(meters) | (meters <= 0.0)] = np.nan
    return meters


def box_depth(depth_m: np.ndarray, box: Box,
              central_fraction: float = CENTRAL_FRACTION) -> Optional[float]:
    """The depth of the object in ``box`` (continuous pixels), or None without enough valid
    pixels in its central part (see the module's description)."""
    if not 0.0 < central_fraction <= 1.0:
        raise ValueError(f'central_fraction must lie in (0, 1], not {central_fraction}')
    height, width = depth_m.shape
    x1, y1, x2, y2 = box
    margin_x = (x2 - x1) * (1.0 - central_fraction) / 2.0
    margin_y = (y2 - y1) * (1.0 - central_fraction) / 2.0
    left, right = _pixel_range(x1 + margin_x, x2 - margin_x, width)
    top, bottom = _pixel_range(y1 + margin_y, y2 - margin_y, height)
    region = depth_m[top:bottom, left:right]
    valid = region[np.isfinite(region) & (region > 0.0)]
    if valid.size < MIN_VALID_PIXELS:
        return None
    near = float(np.percentile(valid, NEAR_PERCENTILE))
    band = max(SURFACE_BAND * near, SURFACE_BAND_MIN_M)
    surface = valid[np.abs(valid - near) <= band]
    return float(np.median(surface))


def _pixel_range(low: float, high: float, size: int) -> Tuple[int, int]:
    """The pixel indices whose centres lie in [low, high), within the image (never empty
    for a box inside the image: at least the pixel under its centre)."""
    start = int(np.ceil(low - 0.5))
    stop = int(np.ceil(high - 0.5))
    if stop <= start:
        start = int(np.floor((low + high) / 2.0))
        stop = start + 1
    return min(max(start, 0), size), min(max(stop, 0), size)


def locate(detections: Sequence[Detection], depth_m: np.ndarray, intrinsics: Intrinsics,
           central_fraction: float = CENTRAL_FRACTION) -> Tuple[List[Located], int]:
    """Place ``detections`` of the colour image in 3D with the registered ``depth_m``.

    Returns the located detections (in input order) and how many had no valid depth.
    :raises DepthFormatError: when the depth image or the intrinsics are not of the size of
        the colour image the detections come from (``intrinsics.width``/``height``).
    """
    height, width = depth_m.shape
    if (width, height) != (intrinsics.width, intrinsics.height):
        raise DepthFormatError(
            f'depth image of {width}x{height} is not registered to the colour image of '
            f'{intrinsics.width}x{intrinsics.height} (align depth to colour)')
    located, without_depth = [], 0
    for detection in detections:
        z = box_depth(depth_m, detection.box, central_fraction)
        if z is None:
            without_depth += 1
            continue
        u, v = detection.center
        position = intrinsics.deproject(u - 0.5, v - 0.5, z)
        box_width, box_height = detection.size
        size_x, size_y = box_width * z / intrinsics.fx, box_height * z / intrinsics.fy
        located.append(Located(detection, position, (size_x, size_y, min(size_x, size_y))))
    return located, without_depth
