"""Detection2DArray crosses a real DDS link between two processes with identical content."""
import os
import random
import subprocess
import sys
import time

import pytest

from locations import SUPPORT_DIR

rclpy = pytest.importorskip('rclpy')
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from vision_msgs.msg import Detection2DArray  # noqa: E402

from dds_peer import known_detections, LATCHED  # noqa: E402


def test_detection_array_crosses_processes_unchanged():
    domain_id = random.randint(1, 200)
    topic = f'cross_process_{os.getpid()}'
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id))
    peer = subprocess.Popen([sys.executable, str(SUPPORT_DIR / 'dds_peer.py'),
                             topic, '60'], env=env, stdin=subprocess.PIPE)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        node = rclpy.create_node('dds_cross_process_receiver', context=context)
        received = []
        node.create_subscription(Detection2DArray, topic, received.append, LATCHED)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 45
        while not received and time.monotonic() < deadline and peer.poll() is None:
            executor.spin_once(timeout_sec=0.2)
        assert received, 'no Detection2DArray arrived from the publisher process'
        assert received[0] == known_detections()
        assert received[0].detections[1].results[0].hypothesis.class_id == 'garbage can'
        executor.shutdown()
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
        peer.stdin.close()
        peer.wait(timeout=20)
