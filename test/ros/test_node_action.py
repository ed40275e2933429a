"""The on-demand ``detect`` action over real DDS: a client on a peer node sends goals to
perception_node running the default model on the CPU (feedback, result, the next camera frame,
goals before stream frames, rejected goals, cancel). Cancelling in the middle of decoding uses
a tiny random Qwen3-VL, which never stops on its own."""
import json

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
pytest.importorskip('torch')
Detect = pytest.importorskip('qwen_vl_perception_interfaces.action').Detect
from action_msgs.msg import GoalStatus  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from vision_msgs.msg import Detection2DArray  # noqa: E402

from qwen_vl_perception.ros.messages import image_msg  # noqa: E402
from qwen_vl_perception.data.scenes import CATEGORIES, render_scene  # noqa: E402

from detect_client import ANSWER_S, Client  # noqa: E402
from node_harness import Harness, Lifecycle, rgb_image  # noqa: E402
from waiting import wait_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings('error::pytest.PytestUnhandledThreadExceptionWarning')


def scene_image(index, stamp_sec):
    """A held-out synthetic scene (a seed the default model was not trained on) as a
    sensor_msgs/Image."""
    scene = render_scene(np.random.default_rng([30_000, index]), 320, 240)
    header = Header(frame_id=f'scene_{index}')
    header.stamp.sec = stamp_sec
    return image_msg(header, scene.image)


@pytest.fixture
def served(default_model_float32):
    harness = Harness({'model_path': str(default_model_float32), 'device': 'cpu',
                       'quantization': 'none', 'score_threshold': 0.0})
    yield harness, Client(harness), Lifecycle(harness)
    harness.close()


def test_a_goal_gets_feedback_and_detections_of_its_image(served):
    harness, client, _ = served
    image = scene_image(0, stamp_sec=1764331200)
    feedback = []
    handle = client.send(Detect.Goal(image=image), feedback)
    assert handle.accepted
    response = client.result(handle)
    assert response.status == GoalStatus.STATUS_SUCCEEDED
    result = response.result
    assert result.message == ''
    assert result.detections.header == image.header
    labels = [d.results[0].hypothesis.class_id for d in result.detections.detections]
    assert labels and set(labels) <= set(CATEGORIES)
    assert '"bbox_2d"' in result.raw_answer
    described = json.loads(result.descriptions)  # the default model is asked for colours
    assert sorted(described['objects']) == sorted(d.id for d in result.detections.detections)
    # Feedback while decoding: the first token, then every 8; objects appear as they close.
    wait_for(lambda: feedback, 10, 'no feedback')
    tokens = [f.tokens_generated for f in feedback]
    assert tokens[0] == 1 and tokens == sorted(set(tokens)) and len(tokens) >= 2
    objects = [f.objects_parsed for f in feedback]
    assert objects == sorted(objects) and objects[-1] <= len(labels)
    assert harness.detections == []  # a goal's result is not a stream frame


def test_a_goal_without_an_image_takes_the_next_camera_frame_even_when_disabled(served):
    harness, client, _ = served
    (result,) = harness.set_parameters(Parameter('enabled', Parameter.Type.BOOL, False))
    assert result.successful
    handle = client.send(Detect.Goal(categories=['ball', 'ring'],
                                     describe=Detect.Goal.DESCRIBE_OFF))
    assert handle.accepted
    camera_frame = scene_image(1, stamp_sec=42)
    harness.publish_when_connected(camera_frame)
    response = client.result(handle)
    assert response.status == GoalStatus.STATUS_SUCCEEDED
    assert response.result.detections.header == camera_frame.header
    assert {d.results[0].hypothesis.class_id for d in response.result.detections.detections} \
        <= {'ball', 'ring'}  # the goal's categories, not the node's four
    assert response.result.descriptions == ''
    assert harness.detections == []  # the stream is disabled


def test_a_goal_goes_before_the_next_stream_frame(served):
    harness, client, _ = served
    order = []
    harness.peer.create_subscription(
        Detection2DArray, 'detections', lambda m: order.append(('stream', m.header.stamp.sec)),
        10)
    harness.publish_when_connected(scene_image(2, stamp_sec=1))  # in flight ...
    wait_for(lambda: harness.node.counters.last_inference_start > 0.0, 60,
             'frame 1 was not taken')
    harness.camera().publish(scene_image(3, stamp_sec=2))  # ... while this frame waits
    handle = client.send(Detect.Goal(image=scene_image(4, stamp_sec=3)))
    assert handle.accepted
    assert harness.node.counters.processed == 0, 'frame 1 finished before the goal came'
    future = handle.get_result_async()
    future.add_done_callback(lambda f: order.append(('goal', 3)))
    wait_for(lambda: len(order) == 3, 3 * ANSWER_S, f'not everything was answered: {order}')
    assert order == [('stream', 1), ('goal', 3), ('stream', 2)]


def test_goals_the_node_would_refuse_are_rejected_with_the_reason_logged(served):
    harness, client, lifecycle = served
    client.rejected_with(Detect.Goal(categories=['cup, bottle']), ',', lifecycle)
    client.rejected_with(Detect.Goal(categories=['']), 'categor', lifecycle)
    client.rejected_with(Detect.Goal(describe=7), 'describe must be', lifecycle)
    bad = rgb_image(5, width=64, height=48)
    bad.step = 10
    client.rejected_with(Detect.Goal(image=bad), 'image: image step 10', lifecycle)
    assert harness.node.counters.goals_rejected == 4
    assert harness.node.counters.goals_accepted == 0


def test_cancel_and_deactivation_end_goals_that_wait_for_a_frame(served):
    harness, client, lifecycle = served
    handle = client.send(Detect.Goal())
    assert handle.accepted
    cancel = handle.cancel_goal_async()
    wait_for(cancel.done, 30, 'the cancel got no answer')
    response = client.result(handle, timeout=30)
    assert response.status == GoalStatus.STATUS_CANCELED
    assert response.result.message == 'canceled before a camera frame came'

    waiting = client.send(Detect.Goal())
    assert waiting.accepted
    assert lifecycle.deactivate()
    response = client.result(waiting, timeout=30)
    assert response.status == GoalStatus.STATUS_ABORTED
    assert response.result.message == 'the node was deactivated'
    client.rejected_with(Detect.Goal(), 'the node is not active', lifecycle)
    assert lifecycle.activate()
    assert client.send(Detect.Goal(image=scene_image(6, stamp_sec=9))).accepted


def test_cancel_stops_decoding_and_the_node_goes_on(tiny_checkpoint):
    """A random tiny model never writes its stop token: only the cancel can end its 4096
    tokens early. The cancel is sent on the first feedback."""
    harness = Harness({'model_path': str(tiny_checkpoint), 'device': 'cpu',
                       'quantization': 'none', 'decoder': 'fast', 'min_pixels': 1024,
                       'max_pixels': 16384, 'categories': ['cup'], 'describe': False,
                       'max_new_tokens': 4096})
    try:
        client = Client(harness)
        feedback, cancels = [], []

        def on_feedback(message):  # in the spinning thread
            feedback.append(message.feedback)
            if not cancels and future.done():
                cancels.append(future.result().cancel_goal_async())

        future = client.client.send_goal_async(
            Detect.Goal(image=rgb_image(1, width=64, height=48)), feedback_callback=on_feedback)
        wait_for(future.done, 30, 'the goal got no answer')
        handle = future.result()
        assert handle.accepted
        response = client.result(handle)
        assert response.status == GoalStatus.STATUS_CANCELED
        assert response.result.message == 'canceled while decoding'
        assert response.result.raw_answer  # the answer so far
        assert feedback[-1].tokens_generated < 4096
        assert harness.node.counters.goals_canceled == 1
        (result,) = harness.set_parameters(Parameter('max_new_tokens', Parameter.Type.INTEGER, 4))
        assert result.successful
        again = client.send(Detect.Goal(image=rgb_image(2, width=64, height=48)))
        assert client.result(again).status == GoalStatus.STATUS_SUCCEEDED
    finally:
        harness.close()
