"""A camera process for end-to-end tests: plays a folder of images as sensor_msgs/Image.

Run as ``python test/support/scene_camera.py IMAGES_DIR TIMEOUT``. Publishes each image (natural
order) on ``image`` with a reliable QoS and the header ``frame_id = <file name>``,
``stamp = (index + 1) s + index ns``, then waits until the node's ``detections`` for that
stamp arrive (lock-step, so that the node's newest-frame-wins policy drops nothing) before
the next. Prints ``sent N answered M`` and exits 0 when every frame was answered, 1 if one
was not answered within TIMEOUT seconds.
"""
import sys
import threading
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection2DArray

from qwen_vl_perception.image_conversion import load_image_file
from qwen_vl_perception.data.image_folder import list_images
from qwen_vl_perception.ros.messages import image_msg

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def frame_header(index: int, name: str) -> Header:
    """The header frame ``index`` (file ``name``) is published with."""
    header = Header(frame_id=name)
    header.stamp.sec = index + 1
    header.stamp.nanosec = index
    return header


def main(folder: str, timeout: float) -> int:
    rclpy.init()
    node = rclpy.create_node('scene_camera')
    answered = set()
    arrived = threading.Condition()

    def on_detections(message):
        with arrived:
            answered.add((message.header.stamp.sec, message.header.stamp.nanosec))
            arrived.notify_all()

    node.create_subscription(Detection2DArray, 'detections', on_detections, RELIABLE)
    camera = node.create_publisher(Image, 'image', RELIABLE)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        return _play(folder, timeout, node, camera, answered, arrived)
    finally:
        stop.set()
        spinner.join()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


def _play(folder, timeout, node, camera, answered, arrived) -> int:
    deadline = time.monotonic() + timeout
    while camera.get_subscription_count() == 0 or node.count_publishers('detections') == 0:
        if time.monotonic() > deadline:
            print('no perception node found', flush=True)
            return 1
        time.sleep(0.05)
    paths = list_images(folder)
    status = 0
    started = time.monotonic()
    for index, path in enumerate(paths):
        header = frame_header(index, path.name)
        camera.publish(image_msg(header, load_image_file(path)))
        with arrived:
            if not arrived.wait_for(lambda: (index + 1, index) in answered, timeout=timeout):
                print(f'frame {index} ({path.name}) not answered in {timeout} s', flush=True)
                status = 1
                break
    seconds = time.monotonic() - started
    print(f'sent {len(paths)} answered {len(answered)} in {seconds:.1f} s '
          f'({seconds / max(1, len(answered)):.2f} s per frame)', flush=True)
    return status


if __name__ == '__main__':
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
