"""Parameter changes at runtime: every value checked by the table's rules, the detection
settings swapped whole (``label_info`` again when the categories or the threshold changed),
and the stream values the node reads on every frame. Read-only parameters never get here
(rclpy refuses them)."""
from dataclasses import dataclass, fields
from typing import Callable, Optional

from rcl_interfaces.msg import SetParametersResult

from ..detector import DetectionSettings, Detector, prepare_settings
from .parameters import SETTINGS_PARAMETERS, check_value, settings_from_values
from .startup import current_settings, value


@dataclass
class StreamValues:
    """The read-write parameters that are not detection settings (the field names are the
    parameters' names)."""

    enabled: bool
    max_rate_hz: float
    depth_box_fraction: float

    @classmethod
    def of(cls, node) -> 'StreamValues':
        """The node's current values."""
        return cls(**{item.name: item.type(value(node, item.name)) for item in fields(cls)})

    def update(self, changes) -> None:
        """Take the new values among ``changes`` (parameter name -> value)."""
        for item in fields(self):
            if item.name in changes:
                setattr(self, item.name, item.type(changes[item.name]))


class ParameterChanges:
    """The node's set-parameters callback: refuses a change with the reason, or takes it (the
    settings go to the Detector while configured, else they are only checked) and updates
    ``stream``."""

    def __init__(self, node, stream: StreamValues, detector: Callable[[], Optional[Detector]],
                 publish_label_info: Callable[[DetectionSettings], None]):
        self._node = node
        self._stream = stream
        self._detector = detector
        self._publish_label_info = publish_label_info

    def __call__(self, parameters) -> SetParametersResult:
        changes = {p.name: p.value for p in parameters}
        for name, new_value in changes.items():
            reason = check_value(name, new_value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        settings_changes = {k: v for k, v in changes.items() if k in SETTINGS_PARAMETERS}
        if settings_changes:
            node = self._node
            current = {name: value(node, name) for name in SETTINGS_PARAMETERS}
            detector = self._detector()
            try:
                settings = settings_from_values({**current, **settings_changes})
                old_categories = current_settings(node).categories
                prepared = (detector.update(settings) if detector is not None
                            else prepare_settings(settings))
            except ValueError as error:
                return SetParametersResult(successful=False, reason=str(error))
            if (prepared.settings.categories != tuple(old_categories)
                    or 'score_threshold' in settings_changes):
                self._publish_label_info(prepared.settings)
            node.get_logger().info('parameters changed: ' + ', '.join(
                f'{name}={settings_changes[name]!r}' for name in sorted(settings_changes)))
        self._stream.update(changes)
        return SetParametersResult(successful=True)
