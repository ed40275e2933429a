"""The node's result topics, as lifecycle publishers: created on configure, publishing only
while the node is active, destroyed on cleanup."""
from typing import Optional, Sequence

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String
from vision_msgs.msg import Detection2DArray, Detection3DArray, LabelInfo
from visualization_msgs.msg import MarkerArray

from ..depth import Located
from ..detector import FrameDetections
from ..drawing import draw_detections
from . import messages

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
RESULTS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.VOLATILE)
"""The per-frame results' QoS, named in full: the middleware's "system default" is
transient-local on Fast DDS, which would hand a late subscriber detections seconds old."""


class Outputs:
    """``detections``, ``descriptions``, ``annotated_image``, ``label_info`` and, with depth,
    ``detections_3d`` and ``markers``."""

    def __init__(self, node, with_depth: bool):
        self._node = node
        create = node.create_lifecycle_publisher
        reliable = RESULTS
        self._publishers = [
            create(Detection2DArray, 'detections', reliable),
            create(Image, 'annotated_image', reliable),
            create(String, 'descriptions', reliable),
            create(LabelInfo, 'label_info', LATCHED),
        ]
        self.detections, self.annotated, self.descriptions, self.label_info = self._publishers
        self.detections_3d = self.markers = None
        if with_depth:
            self.detections_3d = create(Detection3DArray, 'detections_3d', reliable)
            self.markers = create(MarkerArray, 'markers', reliable)
            self._publishers += [self.detections_3d, self.markers]

    def publish_frame(self, header: Header, rgb, result: FrameDetections) -> None:
        """The 2D results of one frame, with its source ``header``."""
        self.detections.publish(messages.detection_array_msg(header, result.detections))
        if result.describe:
            self.descriptions.publish(messages.descriptions_msg(header, result.detections))
        if self.annotated.get_subscription_count() > 0:
            annotated = draw_detections(rgb, result.detections)
            self.annotated.publish(messages.image_msg(header, annotated))

    def publish_3d(self, header: Header, located: Sequence[Located]) -> None:
        self.detections_3d.publish(messages.detection_3d_array_msg(header, located))
        self.markers.publish(messages.marker_array_msg(header, located))

    def publish_label_info(self, categories: Sequence[str], threshold: float,
                           stamp: Optional[object] = None) -> None:
        header = Header(stamp=stamp or self._node.get_clock().now().to_msg())
        self.label_info.publish(messages.label_info_msg(header, categories, threshold))

    def destroy(self) -> None:
        for publisher in self._publishers:
            self._node.destroy_lifecycle_publisher(publisher)
        self._publishers = []
