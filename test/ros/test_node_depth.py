"""3D positions over real DDS: a peer publishes synthetic scenes (colour), their depth (known
per object, with noise and holes, 32FC1 in metres and 16UC1 in millimetres) and camera_info;
perception_node with the default model on the CPU publishes detections_3d and markers.

The model's boxes are its own (a few pixels off the truth: about 2% of the distance on
average at 320x240, up to 6%), so each 3D position is checked against where the node's own 2D
box lies at the object's true depth: within 2%, at 1-5 m."""

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
pytest.importorskip('torch')
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from vision_msgs.msg import Detection3DArray  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from qwen_vl_perception.geometry import iou  # noqa: E402
from qwen_vl_perception.ros.messages import image_msg  # noqa: E402
from qwen_vl_perception.data.scenes import (depth_to_millimetres,  # noqa: E402
                                            render_depth, render_scene)

from node_harness import Harness, diagnostic  # noqa: E402
from waiting import wait_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings('error::pytest.PytestUnhandledThreadExceptionWarning')
ANSWER_S = 300
RELIABLE = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


class DepthCamera:
    """Colour, registered depth and camera_info publishers on the harness's peer."""

    def __init__(self, harness):
        peer = harness.peer
        self.colour = peer.create_publisher(Image, 'image', RELIABLE)
        self.depth = peer.create_publisher(Image, 'depth', RELIABLE)
        self.info = peer.create_publisher(CameraInfo, 'camera_info', RELIABLE)
        self.results_3d, self.markers = [], []
        peer.create_subscription(Detection3DArray, 'detections_3d', self.results_3d.append, 10)
        peer.create_subscription(MarkerArray, 'markers', self.markers.append, 10)
        wait_for(lambda: all(p.get_subscription_count() for p in
                             (self.colour, self.depth, self.info)), 30, 'not connected')

    def play(self, index, stamp, depth_skew_s=0.02, encoding='32FC1', blank_object=None):
        """Scene ``index``: camera_info, then its depth stamped ``stamp + depth_skew_s``, then
        the colour image stamped ``stamp``. Returns the scene, its depth and the header."""
        scene = render_scene(np.random.default_rng([30_000, index]), 320, 240)
        depth = render_depth(scene, np.random.default_rng([30_000, index, 1]), near=1.0,
                             far=5.0, noise=0.01, holes=0.1)
        depth_m = depth.depth_m.copy()
        if blank_object is not None:  # no reading anywhere on (and just around) one object
            x1, y1, x2, y2 = (int(v) for v in scene.objects[blank_object].box)
            depth_m[max(y1 - 3, 0):y2 + 3, max(x1 - 3, 0):x2 + 3] = np.nan
        header = Header(frame_id='camera_color_optical_frame')
        header.stamp.sec, header.stamp.nanosec = stamp, 0
        info = CameraInfo(header=header, width=320, height=240, k=list(depth.camera_k))
        self.info.publish(info)
        depth_header = Header(frame_id=header.frame_id)
        seconds = stamp + depth_skew_s
        depth_header.stamp.sec = int(seconds)
        depth_header.stamp.nanosec = int(round((seconds - int(seconds)) * 1e9))
        self.depth.publish(_depth_message(depth_header, depth_m, encoding))
        self.colour.publish(image_msg(header, scene.image))
        return scene, depth, header


def _depth_message(header, depth_m, encoding):
    values = depth_m.astype('<f4') if encoding == '32FC1' else depth_to_millimetres(depth_m)
    height, width = values.shape
    message = Image(header=header, height=height, width=width, encoding=encoding,
                    is_bigendian=0, step=width * values.itemsize)
    message.data = values.tobytes()
    return message


def _check_positions(array_3d, array_2d, scene, depth):
    """Each 3D detection: same id and label as a 2D one, at that 2D box's centre at the true
    depth of the object it found, within 2%."""
    boxes = {d.id: d for d in array_2d.detections}
    fx, cx, fy, cy = depth.camera_k[0], depth.camera_k[2], depth.camera_k[4], depth.camera_k[5]
    errors = []
    for item in array_3d.detections:
        flat = boxes[item.id]
        assert item.results[0].hypothesis.class_id == flat.results[0].hypothesis.class_id
        u, v = flat.bbox.center.position.x, flat.bbox.center.position.y
        w, h = flat.bbox.size_x, flat.bbox.size_y
        box = (u - w / 2, v - h / 2, u + w / 2, v + h / 2)
        found = max(range(len(scene.objects)), key=lambda i: iou(box, scene.objects[i].box))
        assert iou(box, scene.objects[found].box) > 0.5, 'the model found no such object'
        z = depth.object_depths[found]
        expected = np.array([(u - 0.5 - cx) * z / fx, (v - 0.5 - cy) * z / fy, z])
        position = item.bbox.center.position
        got = np.array([position.x, position.y, position.z])
        errors.append(np.linalg.norm(got - expected) / np.linalg.norm(expected))
        assert (item.results[0].pose.pose.position.x, item.bbox.size.x) == \
            pytest.approx((position.x, w * z / fx), rel=0.03)
    print(f'3D errors against the 2D boxes at the true depth: {np.round(errors, 4)}')
    assert max(errors) < 0.02, errors
    return errors


@pytest.fixture
def harness(default_model_float32):
    instance = Harness({'model_path': str(default_model_float32), 'device': 'cpu',
                        'quantization': 'none', 'score_threshold': 0.0, 'use_depth': True,
                        'input_reliability': 'reliable', 'depth_max_skew_s': 0.05})
    yield instance
    instance.close()


def test_3d_positions_markers_and_frames_without_depth(harness):
    camera = DepthCamera(harness)

    def answered(stamp):
        wait_for(lambda: any(a.header.stamp.sec == stamp for a in harness.detections),
                 ANSWER_S, f'frame {stamp} was not answered')
        return next(a for a in harness.detections if a.header.stamp.sec == stamp)

    # 1: depth 20 ms after colour (within 50 ms), 32FC1 metres with 1% noise, 10% holes.
    scene, depth, header = camera.play(1, stamp=100)
    flat = answered(100)
    wait_for(lambda: camera.results_3d, 60, 'no detections_3d')
    (array,) = camera.results_3d
    assert array.header == header  # the colour image's stamp and optical frame
    assert [d.id for d in array.detections] == [d.id for d in flat.detections]
    _check_positions(array, flat, scene, depth)
    wait_for(lambda: camera.markers, 30, 'no markers')
    markers = camera.markers[0].markers
    assert markers[0].action == Marker.DELETEALL
    assert [m.type for m in markers[1:]] == [Marker.CUBE, Marker.TEXT_VIEW_FACING] * len(
        array.detections)
    assert all(m.header == header for m in markers)

    # 2: depth 200 ms after colour: no pair, published 2D-only and counted.
    camera.play(2, stamp=200, depth_skew_s=0.2)
    answered(200)

    # 3: 16UC1 millimetres (0 = no reading), one object without any reading.
    scene, depth, header = camera.play(3, stamp=300, encoding='16UC1', blank_object=0)
    flat = answered(300)
    wait_for(lambda: len(camera.results_3d) == 2, 60, 'no detections_3d for frame 3')
    # Published in order by one thread: no 3D array for frame 2 came before frame 3's.
    assert [a.header.stamp.sec for a in camera.results_3d] == [100, 300]
    array = camera.results_3d[1]
    blank = scene.objects[0].box
    located_boxes = {d.id for d in array.detections}
    missing = [d for d in flat.detections if d.id not in located_boxes]
    assert missing, 'the object without depth got a 3D position'
    for item in missing:
        c = item.bbox.center.position
        assert blank[0] <= c.x <= blank[2] and blank[1] <= c.y <= blank[3]
    _check_positions(array, flat, scene, depth)
    counters = harness.node.counters
    assert counters.frames_3d == 2 and counters.frames_without_depth == 1
    assert counters.objects_without_depth == len(missing)
    wait_for(lambda: any(diagnostic(d, 'frames_without_depth') == '1'
                         for d in harness.diagnostics), 10, 'not in /diagnostics')
