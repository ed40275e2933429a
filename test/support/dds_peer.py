"""A separate ROS 2 process for cross-process tests: publishes a known Detection2DArray.

Run as ``python test/support/dds_peer.py TOPIC SECONDS``; it publishes on TOPIC with reliable,
transient-local QoS (a late subscriber still gets the message) and exits after SECONDS or when
its standard input closes.
"""
import sys
import threading

import rclpy
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


def known_detections() -> Detection2DArray:
    """The message both processes agree on (every field type of Detection2D used)."""
    array = Detection2DArray()
    array.header.frame_id = 'camera_optical_frame'
    array.header.stamp.sec = 1764331200
    array.header.stamp.nanosec = 123456789
    objects = [('cup', 320.5, 240.25, 64.0, 80.0, 0.93),
               ('garbage can', 10.0, 470.0, 20.0, 20.0, 0.5)]
    for index, (label, cx, cy, w, h, score) in enumerate(objects):
        detection = Detection2D()
        detection.header = array.header
        detection.id = str(index)
        detection.bbox.center.position.x = cx
        detection.bbox.center.position.y = cy
        detection.bbox.size_x = w
        detection.bbox.size_y = h
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = label
        hypothesis.hypothesis.score = score
        detection.results.append(hypothesis)
        array.detections.append(detection)
    return array


def main(topic: str, seconds: float) -> None:
    rclpy.init()
    node = rclpy.create_node('dds_peer_publisher')
    publisher = node.create_publisher(Detection2DArray, topic, LATCHED)
    publisher.publish(known_detections())
    stdin_closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
    stdin_closed.wait(seconds)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == '__main__':
    main(sys.argv[1], float(sys.argv[2]))
