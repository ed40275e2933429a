"""Core results to ROS messages (and back for tests); no logic beyond field mapping."""
import json
from typing import Iterable, Sequence

import numpy as np
from sensor_msgs.msg import Image
from std_msgs.msg import String
from vision_msgs.msg import (Detection2D, Detection2DArray, Detection3D, Detection3DArray,
                             LabelInfo, ObjectHypothesisWithPose, VisionClass)
from visualization_msgs.msg import Marker, MarkerArray

from ..depth import Located
from ..detection import Detection
from ..drawing import label_color
from ..image_conversion import rgb_to_image_fields


def detection_array_msg(header, detections: Iterable[Detection]) -> Detection2DArray:
    """A Detection2DArray stamped with the source image's ``header`` (array and each item)."""
    array = Detection2DArray(header=header)
    for detection in detections:
        item = Detection2D(header=header, id=detection.id)
        (item.bbox.center.position.x, item.bbox.center.position.y) = detection.center
        item.bbox.size_x, item.bbox.size_y = detection.size
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = detection.label
        hypothesis.hypothesis.score = float(detection.score)
        item.results.append(hypothesis)
        array.detections.append(item)
    return array


def label_info_msg(header, categories: Sequence[str], threshold: float) -> LabelInfo:
    """LabelInfo mapping class index -> category name; class_id in detections is the name."""
    return LabelInfo(header=header, threshold=float(threshold),
                     class_map=[VisionClass(class_id=index, class_name=name)
                                for index, name in enumerate(categories)])


def descriptions_msg(header, detections: Iterable[Detection]) -> String:
    """Per-detection attributes as JSON keyed by detection id, with the image's stamp/frame."""
    payload = {
        'stamp': {'sec': header.stamp.sec, 'nanosec': header.stamp.nanosec},
        'frame_id': header.frame_id,
        'objects': {d.id: {'label': d.label, 'score': round(float(d.score), 4),
                           **d.attributes} for d in detections},
    }
    return String(data=json.dumps(payload, ensure_ascii=False))


def image_msg(header, rgb: np.ndarray, encoding: str = 'rgb8') -> Image:
    """A sensor_msgs/Image of an RGB array, with ``header``."""
    fields = rgb_to_image_fields(rgb, encoding)
    message = Image(header=header, height=fields['height'], width=fields['width'],
                    encoding=fields['encoding'], is_bigendian=fields['is_bigendian'],
                    step=fields['step'])
    message.data = fields['data']
    return message


def detection_3d_array_msg(header, located: Iterable[Located]) -> Detection3DArray:
    """Detection3DArray with the colour image's ``header`` (the optical frame): ids, labels
    and scores as in the 2D array; the box centre and the hypothesis pose at the position."""
    array = Detection3DArray(header=header)
    for item in located:
        detection = Detection3D(header=header, id=item.detection.id)
        center = detection.bbox.center
        center.position.x, center.position.y, center.position.z = item.position
        center.orientation.w = 1.0
        detection.bbox.size.x, detection.bbox.size.y, detection.bbox.size.z = item.size
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = item.detection.label
        hypothesis.hypothesis.score = float(item.detection.score)
        hypothesis.pose.pose = center
        detection.results.append(hypothesis)
        array.detections.append(detection)
    return array


def marker_array_msg(header, located: Sequence[Located]) -> MarkerArray:
    """rviz markers for the 3D detections: a DELETEALL (the previous frame's markers go),
    then per object a translucent box in its label's colour and its label above it."""
    markers = [Marker(header=header, ns='detections', action=Marker.DELETEALL)]
    for index, item in enumerate(located):
        red, green, blue = (channel / 255.0 for channel in label_color(item.detection.label))
        box = Marker(header=header, ns='detections', id=2 * index, type=Marker.CUBE,
                     action=Marker.ADD)
        box.pose.position.x, box.pose.position.y, box.pose.position.z = item.position
        box.pose.orientation.w = 1.0
        box.scale.x, box.scale.y, box.scale.z = item.size
        box.color.r, box.color.g, box.color.b, box.color.a = red, green, blue, 0.5
        label = Marker(header=header, ns='detections', id=2 * index + 1,
                       type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                       text=f'{item.detection.label} {item.detection.score:.2f}')
        label.pose.position.x, label.pose.position.y, label.pose.position.z = item.position
        label.pose.position.y -= item.size[1] / 2.0 + 0.05  # above the box (y is down)
        label.pose.orientation.w = 1.0
        label.scale.z = 0.1
        label.color.r = label.color.g = label.color.b = label.color.a = 1.0
        markers += [box, label]
    return MarkerArray(markers=markers)
