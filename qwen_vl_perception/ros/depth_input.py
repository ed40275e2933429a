"""The node's depth input: ``depth`` and ``camera_info`` subscriptions (while active), each
colour frame paired with the depth frame nearest in stamp, and the frame's 3D positions.

The math is in :mod:`qwen_vl_perception.depth` and :mod:`qwen_vl_perception.stamp_pairing`;
this module only moves messages. Depth messages are kept as they come (converted only for a
frame that is published), for ``keep_s`` seconds of stamps; the newest camera_info is used.
"""
from typing import List, Optional, Tuple

from rclpy.qos import QoSProfile
from sensor_msgs.msg import CameraInfo, Image

from ..depth import DepthFormatError, Intrinsics, Located, depth_msg_to_meters, locate
from ..stamp_pairing import NearestStamp, Pairing

WAIT_FOR_DEPTH_S = 0.2
"""After inference, how long a frame whose depth frame has not arrived yet waits for it."""


def stamp_seconds(header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


class DepthInput:
    def __init__(self, node, camera_qos: QoSProfile, max_skew_s: float, counters):
        self._node = node
        self._counters = counters
        self._pairing = NearestStamp(max_skew_s, keep_s=max(1.0, 4.0 * max_skew_s))
        self._camera_info: Optional[CameraInfo] = None
        self._subscriptions = [
            node.create_subscription(Image, 'depth', self._on_depth, camera_qos),
            node.create_subscription(CameraInfo, 'camera_info', self._on_camera_info,
                                     camera_qos),
        ]

    def _on_depth(self, message: Image) -> None:
        self._pairing.add(stamp_seconds(message.header), message)

    def _on_camera_info(self, message: CameraInfo) -> None:
        self._camera_info = message

    def request(self, header) -> Pairing:
        """Start pairing a colour frame (call it when the frame arrives)."""
        return self._pairing.request(stamp_seconds(header))

    def locate(self, pairing: Pairing, detections, image_size: Tuple[int, int],
               box_fraction: float) -> Optional[List[Located]]:
        """The frame's detections in 3D, or None (counted) when it has no usable depth."""
        depth_message = self._pairing.resolve(pairing, wait_s=WAIT_FOR_DEPTH_S)
        info = self._camera_info  # the newest: a camera's intrinsics do not change per frame
        if depth_message is None or info is None:
            self._counters.add('frames_without_depth')
            why = 'no depth frame within depth_max_skew_s' if info is not None else \
                'no camera_info yet'
            self._node.get_logger().warning(f'a frame is published 2D-only: {why}',
                                            throttle_duration_sec=5.0)
            return None
        width, height = image_size
        try:
            if (info.width, info.height) not in ((width, height), (0, 0)):
                raise DepthFormatError(f'camera_info is for {info.width}x{info.height}, the '
                                       f'colour image is {width}x{height}')
            intrinsics = Intrinsics.from_k(info.k, width, height)
            located, without_depth = locate(detections, depth_msg_to_meters(depth_message),
                                            intrinsics, box_fraction)
        except DepthFormatError as error:
            self._counters.add('invalid_depth')
            self._counters.add('frames_without_depth')
            self._node.get_logger().warning(f'depth not used: {error}',
                                            throttle_duration_sec=5.0)
            return None
        self._counters.add('objects_without_depth', without_depth)
        self._counters.add('frames_3d')
        return located

    def destroy(self) -> None:
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions = []
