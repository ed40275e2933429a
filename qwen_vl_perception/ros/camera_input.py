"""The node's camera subscriptions (while active): each message is checked and converted in
its callback (a compressed one only checked: the inference thread decodes it) and handed on as
a :class:`Frame`; a bad image is logged (throttled), counted and skipped."""
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ..image_conversion import ImageFormatError, compressed_msg_decoder


@dataclass
class Frame:
    header: Header
    rgb: Optional[np.ndarray]
    received: float
    decode: Optional[Callable[[], np.ndarray]] = None
    """Set for a compressed image, checked but not decoded yet: the worker decodes it."""
    locate: Optional[Callable[..., Any]] = None
    """With depth: the frame's 3D positions from its paired depth frame (DepthInput.locate)."""


def camera_qos(reliable: bool) -> QoSProfile:
    """Sensor-data QoS (best effort: accepts reliable and best-effort cameras), or reliable."""
    profile = QoSProfile(history=qos_profile_sensor_data.history,
                         depth=qos_profile_sensor_data.depth,
                         reliability=qos_profile_sensor_data.reliability,
                         durability=qos_profile_sensor_data.durability)
    if reliable:
        profile.reliability = ReliabilityPolicy.RELIABLE
    return profile


class CameraInput:
    """``image`` (or ``<topic>/compressed``) subscriptions; ``deliver(frame, topic)`` gets
    each good frame while ``wanted()`` says so."""

    def __init__(self, node, topics, compressed: bool, qos: QoSProfile, convert_raw,
                 max_image_pixels: int, wanted: Callable[[], bool],
                 deliver: Callable[[Frame, str], None], counters):
        self._node = node
        self._max_image_pixels = max_image_pixels
        self._wanted = wanted
        self._deliver = deliver
        self._counters = counters
        self._subscriptions = []
        for topic in topics:
            if compressed:
                self._subscriptions.append(node.create_subscription(
                    CompressedImage, topic + '/compressed',
                    lambda m, t=topic: self._accept(m, compressed_msg_decoder, t), qos))
            else:
                self._subscriptions.append(node.create_subscription(
                    Image, topic, lambda m, t=topic: self._accept(m, convert_raw, t), qos))

    def _accept(self, message, convert, topic: str) -> None:
        """``convert`` gives the RGB array, or (compressed images) a function decoding it."""
        self._counters.received += 1
        if not self._wanted():
            return
        try:
            converted = convert(message, max_pixels=self._max_image_pixels)
        except ImageFormatError as error:
            skip_image(self._node, self._counters, error)
            return
        frame = Frame(header=message.header, rgb=None, received=time.monotonic())
        if callable(converted):
            frame.decode = converted
        else:
            frame.rgb = converted
        self._deliver(frame, topic)

    def destroy(self) -> None:
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions = []


def skip_image(node, counters, error: ImageFormatError) -> None:
    counters.add('invalid_images')
    node.get_logger().warning(f'skipped an image: {error}', throttle_duration_sec=5.0)


def decoded(node, counters, frame: Frame) -> bool:
    """Decode a compressed frame (in the worker); False, counted and logged, if it fails."""
    if frame.decode is not None:
        try:
            frame.rgb = frame.decode()
        except ImageFormatError as error:
            skip_image(node, counters, error)
            return False
        frame.decode = None
    return True
