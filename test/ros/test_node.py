"""perception_node end to end over real DDS, in this process, with a real (tiny, trained)
Qwen3-VL on the CPU.

The model is trained to answer one known text (``answering_model``), so the expected pixel
boxes, attributes and ids are known exactly; what is tested is the node: headers, coordinates,
QoS, parameters, malformed input, frame dropping and start-up refusals. The node as a process
(start-up errors, signals, image bombs): test_node_process.py.
"""
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
pytest.importorskip('torch')
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from vision_msgs.msg import Detection2DArray, LabelInfo  # noqa: E402

from qwen_vl_perception.ros.node import LATCHED, PerceptionNode, StartupError  # noqa: E402

from answering_model import ATTRIBUTES, CATEGORIES, EXPECTED, node_parameters  # noqa: E402
from node_harness import Harness, diagnostic, rgb_image  # noqa: E402
from waiting import wait_for  # noqa: E402

# A thread that fails (e.g. InvalidHandle from a node destroyed under a spinning executor)
# fails the test instead of leaving a warning.
pytestmark = pytest.mark.filterwarnings('error::pytest.PytestUnhandledThreadExceptionWarning')


@pytest.fixture
def harness(answering_checkpoint):
    instance = Harness(node_parameters(answering_checkpoint))
    yield instance
    instance.close()


def test_detections_carry_the_source_header_and_pixel_boxes(harness):
    image = rgb_image(stamp_sec=1764331200, frame_id='front_camera_optical')
    harness.publish_when_connected(image)
    wait_for(lambda: harness.detections, 30, 'no detections published')
    array = harness.detections[0]
    assert array.header == image.header
    assert [d.header for d in array.detections] == [image.header] * 2
    for detection, (label, center, size, _) in zip(array.detections, EXPECTED):
        (hypothesis,) = detection.results
        assert hypothesis.hypothesis.class_id == label
        assert 0.5 < hypothesis.hypothesis.score <= 1.0
        assert (detection.bbox.center.position.x, detection.bbox.center.position.y) == \
            pytest.approx(center)
        assert (detection.bbox.size_x, detection.bbox.size_y) == pytest.approx(size)
    assert [d.id for d in array.detections] == ['0', '1']
    wait_for(lambda: harness.descriptions, 10, 'no descriptions published')
    description = json.loads(harness.descriptions[0].data)
    assert description['frame_id'] == 'front_camera_optical'
    assert description['stamp'] == {'sec': 1764331200, 'nanosec': 500}
    assert {key: value['color'] for key, value in description['objects'].items()} == \
        {'0': 'red', '1': 'green'}


def test_a_subscriber_that_joins_late_gets_no_earlier_frames(harness):
    """The per-frame outputs are volatile: a late subscriber gets the frames after it joined,
    none from before (one asking for transient-local is not served at all)."""
    harness.publish_when_connected(rgb_image(stamp_sec=1))
    wait_for(lambda: harness.detections, 30, 'no detections published')
    late, stored = [], []
    for durability, received in ((DurabilityPolicy.VOLATILE, late),
                                 (DurabilityPolicy.TRANSIENT_LOCAL, stored)):
        harness.peer.create_subscription(
            Detection2DArray, 'detections', received.append,
            QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=durability))
    for stamp in range(2, 30):  # new frames until the late subscriber has one
        harness.publish_when_connected(rgb_image(stamp_sec=stamp))
        wait_for(lambda: harness.detections[-1].header.stamp.sec == stamp, 30, 'no detections')
        if late:
            break
    assert late and min(array.header.stamp.sec for array in late) >= 2
    assert stored == []


def test_best_effort_and_reliable_cameras_are_both_heard(harness):
    harness.publish_when_connected(rgb_image(1), ReliabilityPolicy.BEST_EFFORT)
    wait_for(lambda: len(harness.detections) == 1, 30, 'best-effort camera not heard')
    harness.publish_when_connected(rgb_image(2), ReliabilityPolicy.RELIABLE)
    wait_for(lambda: len(harness.detections) == 2, 30, 'reliable camera not heard')
    assert [a.header.stamp.sec for a in harness.detections] == [1, 2]


def test_annotated_image_is_published_to_subscribers(harness):
    annotated = []
    harness.peer.create_subscription(Image, 'annotated_image', annotated.append, 10)
    wait_for(lambda: harness.node.count_subscribers('annotated_image') > 0, 10, 'no match')
    image = rgb_image(7)
    harness.publish_when_connected(image)
    wait_for(lambda: annotated, 30, 'no annotated image')
    out = annotated[0]
    assert out.header == image.header and (out.width, out.height) == (640, 480)
    assert bytes(out.data) != bytes(image.data)


def test_categories_change_at_runtime_and_label_info_follows(harness):
    wait_for(lambda: harness.label_infos, 10, 'no latched label_info')
    assert [c.class_name for c in harness.label_infos[-1].class_map] == CATEGORIES
    (result,) = harness.set_parameters(
        Parameter('categories', Parameter.Type.STRING_ARRAY, ['cup', 'chair', 'cup ']))
    assert result.successful, result.reason
    wait_for(lambda: len(harness.label_infos) >= 2, 10, 'label_info not republished')
    assert [(c.class_id, c.class_name) for c in harness.label_infos[-1].class_map] == \
        [(0, 'cup'), (1, 'chair')]
    assert harness.node.detector.settings.categories == ('cup', 'chair')
    late = []
    harness.peer.create_subscription(LabelInfo, 'label_info', late.append, LATCHED)
    wait_for(lambda: late, 10, 'a late subscriber did not get the latched label_info')
    assert [c.class_name for c in late[0].class_map] == ['cup', 'chair']


@pytest.mark.parametrize('parameter, reason_part', [
    (Parameter('categories', Parameter.Type.STRING_ARRAY, []), 'categor'),
    # `ros2 param set ... categories "[]"` sends an empty bool array: the node's own reason,
    # not rclpy's "Wrong parameter type, expected '9' got '6'".
    (Parameter('categories', Parameter.Type.BOOL_ARRAY, []), 'categories must not be empty'),
    (Parameter('categories', Parameter.Type.BYTE_ARRAY, []), 'categories must not be empty'),
    (Parameter('categories', Parameter.Type.INTEGER_ARRAY, [1, 2]), 'list of strings'),
    (Parameter('categories', Parameter.Type.STRING, 'cup'), 'list of strings'),
    (Parameter('attributes', Parameter.Type.BOOL_ARRAY, []), 'attribute'),  # describe is on
    (Parameter('categories', Parameter.Type.STRING_ARRAY, ['cup, bottle']), ','),
    (Parameter('coordinate_convention', Parameter.Type.STRING, 'pixels'), 'qwen3_grid'),
    (Parameter('score_threshold', Parameter.Type.DOUBLE, 1.5), 'range'),
    (Parameter('max_rate_hz', Parameter.Type.INTEGER, 2), 'type'),
    (Parameter('prompt_template', Parameter.Type.STRING, 'find {objects}'), 'categories'),
    (Parameter('model_path', Parameter.Type.STRING, '/elsewhere'), 'read-only'),
])
def test_bad_parameters_are_refused_with_a_reason(harness, parameter, reason_part):
    (result,) = harness.set_parameters(parameter)
    assert not result.successful
    assert reason_part in result.reason
    assert harness.node.detector.settings.categories == tuple(CATEGORIES)


def test_an_empty_list_of_any_type_is_an_empty_list_and_not_set_is_refused(harness):
    assert harness.set_parameters(Parameter('describe', Parameter.Type.BOOL, False))[0].successful
    (result,) = harness.set_parameters(Parameter('attributes', Parameter.Type.BYTE_ARRAY, []))
    assert result.successful, result.reason
    assert harness.node.detector.settings.attributes == ()
    (result,) = harness.set_parameters(Parameter('categories', Parameter.Type.NOT_SET))
    assert not result.successful and 'categories must be set' in result.reason
    assert harness.node.get_parameter('categories').value == CATEGORIES


def test_malformed_images_are_skipped_and_the_next_good_frame_is_processed(harness):
    short = rgb_image(10)
    short.data = bytes(short.data)[:-7]
    bad_step = rgb_image(11)
    bad_step.step = 100
    unknown = rgb_image(12)
    unknown.encoding = '32FC7'
    for message in (short, bad_step, unknown):
        harness.publish_when_connected(message)
    harness.publish_when_connected(rgb_image(13))
    wait_for(lambda: harness.detections, 30, 'the good frame was not processed')
    assert [a.header.stamp.sec for a in harness.detections] == [13]
    assert harness.node.counters.invalid_images == 3
    wait_for(lambda: any(diagnostic(d, 'invalid_images') == '3'
                         for d in harness.diagnostics), 5, 'diagnostics do not count them')


def test_frames_are_dropped_not_queued_when_the_model_is_slower(harness):
    reliable = ReliabilityPolicy.RELIABLE  # no frame is lost in transport: drops are the node's
    harness.publish_when_connected(rgb_image(100), reliable)
    for stamp in range(101, 131):
        harness.camera(reliable).publish(rgb_image(stamp))
        time.sleep(0.002)
    wait_for(lambda: harness.detections and harness.detections[-1].header.stamp.sec == 130, 60,
             'the newest frame was never processed')
    time.sleep(0.5)
    processed = [a.header.stamp.sec for a in harness.detections]
    assert processed == sorted(processed) and processed[-1] == 130
    assert len(processed) < 31
    # Every frame that reached the node was either answered or dropped, none queued.
    assert harness.node.frames_dropped == harness.node.counters.received - len(processed)
    assert harness.node.frames_dropped > 0


def test_compressed_transport_and_rate_limit(answering_checkpoint):
    import cv2
    harness = Harness(node_parameters(answering_checkpoint, input_transport='compressed',
                                      max_rate_hz=0.4))
    try:
        publisher = harness.peer.create_publisher(CompressedImage, 'image/compressed', 10)
        wait_for(lambda: publisher.get_subscription_count() > 0, 10, 'not connected')
        pixels = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        starts = []
        for stamp in (1, 2, 3):
            message = CompressedImage(format='jpeg',
                                      data=cv2.imencode('.jpg', pixels)[1].tobytes())
            message.header.stamp.sec = stamp
            publisher.publish(message)
            wait_for(lambda: len(harness.detections) == stamp, 60, f'frame {stamp} unanswered')
            starts.append(harness.node.counters.last_inference_start)
        assert [len(a.detections) for a in harness.detections] == [2, 2, 2]
        # At most 0.4 inferences per second: the node began its inferences 2.5 s apart
        # (its own clock), although each frame was published as soon as the previous result
        # arrived. What the node decided, not when results arrived: load cannot shorten it.
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert min(gaps) >= 2.5, gaps
        garbage = CompressedImage(format='jpeg', data=b'not a jpeg')
        publisher.publish(garbage)
        wait_for(lambda: harness.node.counters.invalid_images == 1, 10, 'garbage not counted')
    finally:
        harness.close()


def test_unset_categories_are_what_the_model_was_trained_on(answering_checkpoint):
    parameters = node_parameters(answering_checkpoint)
    for name in ('categories', 'describe', 'attributes'):
        del parameters[name]
    harness = Harness(parameters)
    try:
        assert harness.node.get_parameter('categories').value == CATEGORIES
        assert harness.node.get_parameter('attributes').value == ATTRIBUTES
        harness.publish_when_connected(rgb_image(3))
        wait_for(lambda: harness.detections, 30, 'no detections published')
        assert [d.results[0].hypothesis.class_id for d in harness.detections[0].detections] == \
            ['cup', 'bottle']
    finally:
        harness.close()


def test_ready_line_counts_one_category_and_destroying_stops_the_worker(
        answering_checkpoint, capfd):
    harness = Harness(node_parameters(answering_checkpoint, categories=['cup']))
    assert 'ready: 1 category, model on cpu' in capfd.readouterr().err
    worker = harness.node.inference_thread
    assert worker.is_alive()
    harness.spinner.stop()
    harness.node.destroy_node()  # without shutdown() first: the worker must stop all the same
    assert not worker.is_alive() and harness.node.inference_thread is None
    harness.peer.destroy_node()
    rclpy.try_shutdown(context=harness.context)


def test_unset_pixel_budget_is_a_tool_trained_models_own(answering_checkpoint, tmp_path):
    import shutil
    from qwen_vl_perception.model.pixel_budget import write_pixel_budget
    from qwen_vl_perception.trained_prompt import PROMPT_FILE
    model = Path(shutil.copytree(answering_checkpoint, tmp_path / 'model'))
    write_pixel_budget(model, 512, 12288)  # 512 is below the parameter's range: kept at 1024
    for has_prompt_file, expected in ((True, (1024, 12288)), (False, (65536, 409600))):
        if not has_prompt_file:  # a stock checkpoint: its processor budget is no default
            (model / PROMPT_FILE).unlink()
        parameters = node_parameters(model)
        del parameters['min_pixels'], parameters['max_pixels']
        harness = Harness(parameters)
        try:
            node = harness.node
            assert (node.get_parameter('min_pixels').value,
                    node.get_parameter('max_pixels').value) == expected
            inputs = node.detector.engine.inputs
            assert (inputs.min_pixels, inputs.max_pixels) == expected
        finally:
            harness.close()


def test_frames_of_several_cameras_ready_together_are_decoded_as_one_batch(answering_checkpoint):
    harness = Harness(node_parameters(answering_checkpoint,
                                      image_topics=['front/image', 'rear/image']))
    try:
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        front = harness.peer.create_publisher(Image, 'front/image', qos)
        rear = harness.peer.create_publisher(Image, 'rear/image', qos)
        wait_for(lambda: front.get_subscription_count() and rear.get_subscription_count(), 10,
                 'cameras not connected')
        front.publish(rgb_image(1, 'front'))  # keeps the model busy ...
        slots = harness.node.frame_slots
        wait_for(lambda: slots.accepted == 1 and slots.waiting == 0, 30, 'frame 1 not taken')
        front.publish(rgb_image(2, 'front'))  # ... while these two wait together
        rear.publish(rgb_image(2, 'rear'))
        wait_for(lambda: len(harness.detections) == 3, 60, 'not every frame was answered')
        assert harness.node.counters.largest_batch == 2
        frames = sorted((a.header.frame_id, a.header.stamp.sec) for a in harness.detections)
        assert frames == [('front', 1), ('front', 2), ('rear', 2)]
        assert all(len(a.detections) == 2 for a in harness.detections)
    finally:
        harness.close()


def test_start_up_refuses_invalid_parameters(tiny_checkpoint):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=random.randint(1, 200))
    try:
        for overrides, message in [({'min_pixels': 50000, 'max_pixels': 40000}, 'min_pixels'),
                                   ({'categories': ['']}, 'categor'),
                                   ({'categories': []}, 'categories must not be empty'),
                                   ({'model_path': ''}, 'model_path is required'),
                                   ({'max_rate_hz': 2}, 'decimal point'),
                                   ({'input_transport': 'compresed'}, 'raw, compressed'),
                                   ({'max_new_tokens': 0}, 'range')]:
            params = node_parameters(tiny_checkpoint, **overrides)
            with pytest.raises(StartupError, match=message):
                PerceptionNode(context=context, parameter_overrides=[
                    Parameter(k, value=v) for k, v in params.items()])
    finally:
        rclpy.try_shutdown(context=context)


def test_disabled_node_ignores_frames_until_enabled(harness):
    (result,) = harness.set_parameters(Parameter('enabled', Parameter.Type.BOOL, False))
    assert result.successful
    harness.publish_when_connected(rgb_image(20))
    wait_for(lambda: harness.node.counters.received == 1, 10, 'frame not received')
    time.sleep(1.0)
    assert harness.detections == []
    (result,) = harness.set_parameters(Parameter('enabled', Parameter.Type.BOOL, True))
    harness.publish_when_connected(rgb_image(21))
    wait_for(lambda: harness.detections, 30, 'no detections after enabling')
    assert [a.header.stamp.sec for a in harness.detections] == [21]


def test_raw_images_of_an_aspect_the_model_cannot_take_are_invalid_not_errors(harness):
    line = Image(height=1, width=4096, encoding='rgb8', step=4096 * 3, data=bytes(4096 * 3))
    line.header.stamp.sec = 40
    harness.publish_when_connected(line)
    widest = Image(height=1, width=200, encoding='rgb8', step=600, data=bytes(600))
    widest.header.stamp.sec = 41  # the most the model takes: answered
    harness.publish_when_connected(widest)
    wait_for(lambda: harness.detections, 60, 'the 200 x 1 frame was not answered')
    assert [a.header.stamp.sec for a in harness.detections] == [41]
    assert harness.node.counters.invalid_images == 1
    assert harness.node.counters.inference_errors == 0
