"""vision_msgs here must be wire-compatible with upstream vision_msgs 4.1.x on robots.

ROS 2 checks compatibility with the RIHS01 type hash of each message; the hashes below are those
of upstream vision_msgs 4.1.1. The test reads the hash the middleware itself announces for a
publisher of each type, so it checks what DDS peers will see, whichever vision_msgs is installed
(the project's build from tools/ros2_env/vision_msgs, or a distro's package).
"""
import importlib

import pytest

rclpy = pytest.importorskip('rclpy')

UPSTREAM_4_1_1_HASHES = {
    'BoundingBox2D': '008eacbb0cf8f26e83795547bed013eec3675485ef386ec056d80eaaf1c1ce2f',
    'BoundingBox2DArray': '2464e82838009386d371b523211c21c91d74d313fcdd6788223c531d621cf691',
    'BoundingBox3D': 'bbb73a65c163d7f9bb29009c7bde9f7faa576bd2d23299c4511d19230dab4698',
    'BoundingBox3DArray': 'a81938db9576b10c2eecd7c5a5da3eac496efd00221b25ed051dfbc81fb56da6',
    'Classification': 'f74db28d0eaef3afb78f48bf2161cd709a1383a0309d3454383b25be11345143',
    'Detection2D': '0d12b69df5c593b3455b7346fac8205437a7d4bcb09b9e0e0b2dde787ded38ea',
    'Detection2DArray': '214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968',
    'Detection3D': 'ddd703be132ab0b69d33121f1bb034132bfbb3b0ac5f9fb1516005ba1c8a265b',
    'Detection3DArray': '793f5eab9595ac1c0da07873cc859db42eae51f0ee76056db8562515d830e018',
    'LabelInfo': '3d37df4015cdf660cc851c51897f2acd957e1ca6205ba0a99aebffb9406b0783',
    'ObjectHypothesis': '51da43cec11c01957a64d1e05a24acd18aae7745ec30b74348ad5f6d634f7f90',
    'ObjectHypothesisWithPose': '41c12344c0396c48b81df12467c192d99b2a0eb1463c5c37194e4223251c80bc',
    'Point2D': 'eab0e83f44ab4de92ceaf76dd7d0e7638f2bdd1d16ffbe16c7a136c48e407247',
    'Pose2D': 'b0b5d1d7b4c20dd4fcde3ed1d4b289a919290572007d67a97043814db25d3648',
    'VisionClass': '1e4a11f0fed50b5623cb8ff26ca0e37952a48a9c074d16f804b44e9164c2037a',
    'VisionInfo': '95d3116a17484ad91c9a2686e1d54890bbfc3ff6c6a2de137738c4950d45d284',
}


@pytest.fixture(scope='module')
def hash_node():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('vision_msgs_hash_check', context=context)
    yield node
    node.destroy_node()
    rclpy.shutdown(context=context)


def test_all_sixteen_types_are_checked():
    assert len(UPSTREAM_4_1_1_HASHES) == 16


@pytest.mark.parametrize('type_name', sorted(UPSTREAM_4_1_1_HASHES))
def test_type_hash_matches_upstream(hash_node, type_name):
    message_type = getattr(importlib.import_module('vision_msgs.msg'), type_name)
    topic = f'hash_check/{type_name.lower()}'
    publisher = hash_node.create_publisher(message_type, topic, 1)
    try:
        (info,) = hash_node.get_publishers_info_by_topic(topic)
        assert str(info.topic_type_hash) == 'RIHS01_' + UPSTREAM_4_1_1_HASHES[type_name]
    finally:
        hash_node.destroy_publisher(publisher)
