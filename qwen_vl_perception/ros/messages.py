"""Core results to ROS messages (and back for tests); no logic beyond field mapping."""
import json
from typing import Iterable, Sequence

import numpy as np
from sensor_msgs.msg import Image
from std_msgs.msg import String
from vision_msgs.msg import (Detection2D, Detection2DArray, LabelInfo, ObjectHypothesisWithPose,
                             VisionClass)

from ..detection import Detection
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
