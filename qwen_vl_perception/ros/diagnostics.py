"""The node's counters and the /diagnostics status made from them."""
import threading
from dataclasses import dataclass, field, fields

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header

from ..detector import FrameDetections


@dataclass
class Counters:
    """What the node has seen and done since it started (all lifecycle states)."""

    received: int = 0
    processed: int = 0
    invalid_images: int = 0
    unknown_labels: int = 0
    invalid_objects: int = 0
    excess_objects: int = 0
    truncated_answers: int = 0
    inference_errors: int = 0
    publish_errors: int = 0
    batches: int = 0
    largest_batch: int = 0
    frames_3d: int = 0
    """Frames published with 3D positions."""
    frames_without_depth: int = 0
    """Frames published 2D-only: no depth frame within depth_max_skew_s, or no camera_info."""
    objects_without_depth: int = 0
    """Objects of 3D frames without a valid depth reading in their box: no 3D for them."""
    invalid_depth: int = 0
    """Depth images or camera_info that could not be used (wrong encoding, size, ...)."""
    largest_in_flight: int = 0
    """backend openai: most requests in flight at once."""
    requests_timed_out: int = 0
    goals_accepted: int = 0
    goals_rejected: int = 0
    goals_succeeded: int = 0
    goals_canceled: int = 0
    goals_aborted: int = 0
    last_latency_s: float = 0.0
    last_inference_s: float = 0.0
    last_inference_start: float = 0.0
    """When the last inference began (``time.monotonic``): the rate limit's decision."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """For counts that more than one thread adds to."""

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + amount)

    def count_published(self, result: FrameDetections, latency_s: float) -> None:
        """A frame's results as they are published (request threads publish side by side,
        backend openai); ``latency_s``: from the frame's arrival."""
        with self.lock:
            self.processed += 1
            self.unknown_labels += len(result.unknown_labels)
            self.invalid_objects += result.invalid
            self.excess_objects += result.excess
            self.truncated_answers += int(result.truncated)
            self.last_inference_s = result.seconds
            self.last_latency_s = latency_s


_REPORTED = {'received': 'frames_received', 'processed': 'frames_processed'}
_TIMES = ('last_inference_s', 'last_latency_s')


def node_status(failure: str, state: str, worker_alive: bool, last_inference_failed: bool,
                enabled: bool, server_warning=None):
    """The status level and message: a failed transition's reason first, then the state
    (``server_warning``: backend openai's (level, message) about its server, if any)."""
    if failure:
        return DiagnosticStatus.ERROR, failure
    if state != 'active':
        return DiagnosticStatus.OK, state
    if not worker_alive:
        return DiagnosticStatus.ERROR, 'inference worker stopped'
    if server_warning is not None:
        return server_warning
    if last_inference_failed:
        return DiagnosticStatus.WARN, 'the last inference failed'
    return DiagnosticStatus.OK, 'running' if enabled else 'disabled'


def diagnostic_array(name: str, counters: Counters, stamp, level: int, message: str,
                     **extra) -> DiagnosticArray:
    """One status ``name`` with every counter (and ``extra`` values) as key/value pairs."""
    values = {}
    for item in fields(counters):
        if item.name in ('lock', 'last_inference_start') or item.name in _TIMES:
            continue
        values[_REPORTED.get(item.name, item.name)] = getattr(counters, item.name)
    for key in _TIMES:
        values[key[:-2] + '_ms'] = round(getattr(counters, key) * 1000.0, 1)
    values.update(extra)
    status = DiagnosticStatus(level=level, name=name, hardware_id='qwen_vl_perception',
                              message=message,
                              values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
    return DiagnosticArray(header=Header(stamp=stamp), status=[status])
