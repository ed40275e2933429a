"""The on-demand ``detect`` action (qwen_vl_perception_interfaces/action/Detect).

Goals share the engine with the camera stream and go first: an accepted goal is queued ahead
of the stream's frames, so it runs right after the inference in flight. A goal without an
image takes the next frame that arrives on the camera topic after it was accepted (also while
``enabled`` is false). During decoding, feedback tells the tokens generated and the objects
readable from them; a cancel request stops decoding after the next token.

A goal is rejected while the node is not active, and for categories, a describe value or an
image that the node would refuse; ROS 2 actions carry no reason for a rejection, so the reason
is logged and shown in ``/diagnostics`` (``last_goal_rejection``). rclpy resumes a waiting
coroutine by busy-polling it, so no execute callback waits here: the inference thread runs
the goal and then hands the finished result to the executor (``execute`` with a callback
that only reports it).
"""
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

from rclpy.action import ActionServer, CancelResponse, GoalResponse

from ..detector import DetectionSettings, FrameDetections, PreparedSettings, prepare_settings
from ..image_conversion import ImageFormatError
from ..parsing import parse_objects
from . import messages
from .parameters import check_value

FEEDBACK_EVERY = 8
"""Feedback after the first token and then every this many tokens (parsing the answer so far
costs a decode of its tokens)."""


def interfaces_missing_reason() -> Optional[str]:
    """Why the action cannot be offered (its interface package is not importable), or None."""
    try:
        from qwen_vl_perception_interfaces.action import Detect  # noqa: F401
    except ImportError as error:
        return (f'qwen_vl_perception_interfaces is not importable ({error}): build it '
                '(tools/setup_env.sh, or colcon: README)')
    return None


@dataclass
class GoalJob:
    """One accepted goal on its way through the inference thread."""

    goal_handle: object
    prepared: PreparedSettings
    image: object = None
    """The RGB array, or a function decoding it (a compressed camera frame)."""
    header: object = None
    state: str = 'waiting'
    """'waiting' (for a camera frame), 'queued', 'running' or 'done'."""
    interrupted: str = ''
    """Why it must stop (the node deactivates), if it must."""
    outcome: str = ''
    result: object = None


class DetectAction:
    """The ``detect`` action server of a node; the node's inference thread runs the goals."""

    def __init__(self, node, accepting: Callable[[], bool],
                 settings: Callable[[], DetectionSettings], convert, submit, counters):
        from qwen_vl_perception_interfaces.action import Detect
        self._Detect = Detect
        self._node = node
        self._accepting = accepting
        self._settings = settings
        self._convert = convert
        self._submit = submit
        self._counters = counters
        self._lock = threading.Lock()
        self._jobs: List[GoalJob] = []  # accepted, not finished
        self._done: List[GoalJob] = []  # finished, outcome not reported yet
        self.last_rejection = ''
        """Why the last goal was rejected ('detect goal rejected: <reason>'), for /diagnostics."""
        self._server = ActionServer(
            node, Detect, 'detect', execute_callback=self._report,
            goal_callback=self._on_goal, handle_accepted_callback=self._on_accepted,
            cancel_callback=self._on_cancel)

    # ------------------------------------------------------------------- executor thread
    def _goal_problem(self, goal) -> Optional[str]:
        if not self._accepting():
            return 'the node is not active'
        if goal.describe not in (goal.DESCRIBE_AS_NODE, goal.DESCRIBE_ON, goal.DESCRIBE_OFF):
            return f'describe must be DESCRIBE_AS_NODE, DESCRIBE_ON or DESCRIBE_OFF, not ' \
                   f'{goal.describe}'
        try:
            self._prepare(goal)
        except ValueError as error:
            return str(error)
        if goal.image.width or goal.image.height:
            try:
                self._convert(goal.image)
            except ImageFormatError as error:
                return f'image: {error}'
        return None

    def _prepare(self, goal) -> PreparedSettings:
        settings = self._settings()
        if goal.categories:
            reason = check_value('categories', list(goal.categories))
            if reason:
                raise ValueError(reason)
            settings = settings.with_changes(categories=tuple(goal.categories))
        if goal.describe != goal.DESCRIBE_AS_NODE:
            settings = settings.with_changes(describe=goal.describe == goal.DESCRIBE_ON)
        return prepare_settings(settings)

    def _on_goal(self, goal) -> GoalResponse:
        problem = self._goal_problem(goal)
        if problem is None:
            return GoalResponse.ACCEPT
        self._counters.add('goals_rejected')
        self.last_rejection = f'detect goal rejected: {problem}'
        self._node.get_logger().warning(self.last_rejection)
        return GoalResponse.REJECT

    def _on_accepted(self, goal_handle) -> None:
        goal = goal_handle.request
        try:
            job = GoalJob(goal_handle, self._prepare(goal))  # checked a moment ago
            if goal.image.width or goal.image.height:
                job.image, job.header = self._convert(goal.image), goal.image.header
                job.state = 'queued'
        except (ValueError, ImageFormatError) as error:  # the settings changed since
            job = GoalJob(goal_handle, None, state='queued')
            self._finish(job, 'aborted', message=str(error))
            return
        self._counters.add('goals_accepted')
        self._node.get_logger().info(
            f'detect goal {uuid.UUID(bytes=bytes(goal_handle.goal_id.uuid))} accepted'
            f"{'' if job.state == 'queued' else ': waiting for the next camera frame'}")
        with self._lock:
            self._jobs.append(job)
        if job.state == 'queued':
            self._submit(job)

    def _on_cancel(self, goal_handle) -> CancelResponse:
        with self._lock:
            job = next((j for j in self._jobs if j.goal_handle is goal_handle), None)
        if job is None:
            return CancelResponse.REJECT
        if job.state == 'waiting':  # no decoding to stop: finished as canceled at once
            self._finish(job, 'canceled', message='canceled before a camera frame came')
        return CancelResponse.ACCEPT

    @property
    def waiting_for_frame(self) -> bool:
        """Whether a goal waits for the next camera frame."""
        with self._lock:
            return any(job.state == 'waiting' for job in self._jobs)

    def offer_frame(self, header, image) -> None:
        """A camera frame arrived (``image``: RGB, or a function decoding it): it is the image
        of every goal waiting for one."""
        with self._lock:
            waiting = [job for job in self._jobs if job.state == 'waiting']
            for job in waiting:
                job.image, job.header, job.state = image, header, 'queued'
        for job in waiting:
            self._submit(job)

    def _report(self, goal_handle):
        """The execute callback: the goal is finished already, only its outcome is told."""
        with self._lock:
            job = next(j for j in self._done if j.goal_handle is goal_handle)
            self._done.remove(job)
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif job.outcome == 'succeeded':
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return job.result

    # ------------------------------------------------------------------ inference thread
    def run(self, job: GoalJob, detector) -> None:
        """Detect in the goal's image (in the inference thread) and finish the goal."""
        with self._lock:
            if job.state != 'queued':
                return  # aborted or canceled meanwhile
            job.state = 'running'
        if job.goal_handle.is_cancel_requested:
            self._finish(job, 'canceled', message='canceled before it ran')
            return
        try:
            rgb = job.image() if callable(job.image) else job.image
        except ImageFormatError as error:
            self._finish(job, 'aborted', message=f'the camera frame is unusable: {error}')
            return
        try:
            (result,) = detector.detect([rgb], job.prepared, on_step=self._hook(job))
        except Exception as error:  # noqa: BLE001 - one goal's failure must not stop the node
            self._counters.add('inference_errors')
            self._finish(job, 'aborted', message=f'inference failed: {error!r}')
            return
        if job.interrupted:
            self._finish(job, 'aborted', result, message=job.interrupted)
        elif job.goal_handle.is_cancel_requested:
            self._finish(job, 'canceled', result, message='canceled while decoding')
        else:
            self._finish(job, 'succeeded', result)

    def _hook(self, job: GoalJob):
        def on_step(step) -> bool:
            if job.interrupted or job.goal_handle.is_cancel_requested:
                return False
            if step.count == 1 or step.count % FEEDBACK_EVERY == 0:
                feedback = self._Detect.Feedback(tokens_generated=step.count)
                if step.texts is not None:
                    feedback.objects_parsed = len(parse_objects(
                        step.texts()[0], job.prepared.matcher,
                        attribute_keys=job.prepared.settings.attributes).objects)
                job.goal_handle.publish_feedback(feedback)
            return True
        return on_step

    # -------------------------------------------------------------------------- any thread
    def interrupt_all(self, reason: str) -> None:
        """Abort every unfinished goal (the node deactivates): waiting and queued ones now,
        the running one after its next token."""
        with self._lock:
            jobs = [job for job in self._jobs if job.state != 'done']
        for job in jobs:
            job.interrupted = reason
            if job.state in ('waiting', 'queued'):
                self._finish(job, 'aborted', message=reason)

    def _finish(self, job: GoalJob, outcome: str, detections: Optional[FrameDetections] = None,
                message: str = '') -> None:
        with self._lock:
            if job.state == 'done':
                return
            job.state = 'done'
            if job in self._jobs:
                self._jobs.remove(job)
        result = self._Detect.Result(message=message)
        if detections is not None:
            result.detections = messages.detection_array_msg(job.header, detections.detections)
            if detections.describe:
                result.descriptions = messages.descriptions_msg(job.header,
                                                                detections.detections).data
            result.raw_answer = detections.raw_text
        elif job.header is not None:
            result.detections.header = job.header
        job.outcome, job.result = outcome, result
        self._counters.add(f'goals_{outcome}')
        executor = self._node.executor
        if executor is None:  # not spinning any more: the goal goes with the node
            return
        with self._lock:
            self._done.append(job)
        # The state changes happen in the executor's thread, like every other action event.
        executor.create_task(self._hand_over, job)

    def _hand_over(self, job: GoalJob) -> None:
        """Let the action server report the finished goal (in the executor)."""
        handle = job.goal_handle
        if handle.is_cancel_requested:  # CANCELING may not go through EXECUTING (older rclpy
            self._server.notify_execute(handle, self._report)  # would try): report directly
        else:
            handle.execute(self._report)

    def destroy(self) -> None:
        self.interrupt_all('the node is shutting down')
        self._server.destroy()
