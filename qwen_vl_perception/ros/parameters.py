"""The node's parameters: one table of names, types, defaults, ranges and descriptions.

README's parameter table is written from this table (keep them in step). Read-only parameters
are fixed at start-up (rclpy refuses changes); the others change detection from the next frame.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType)
from rclpy.parameter import Parameter

from ..backends import BACKENDS
from ..categories import ARTICLE_CATEGORIES
from ..detector import DEFAULT_ATTRIBUTES, DetectionSettings
from ..geometry import CONVENTIONS, GRID_1000
from ..model import pixel_budget
from ..model.loading import QUANTIZATIONS
from ..trained_prompt import read_prompt_file

DEVICES_HELP = "'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'"
DECODERS = ('auto', 'fast', 'hf')
TRANSPORTS = ('raw', 'compressed')
RELIABILITIES = ('best_effort', 'reliable')


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    default: Any
    type: int
    description: str
    read_only: bool = False
    int_range: Optional[Tuple[int, int]] = None
    float_range: Optional[Tuple[float, float]] = None
    choices: Tuple[str, ...] = ()
    from_model: bool = False
    """Left unset, it takes the value the model was fine-tuned with (detection_prompt.json
    beside the weights), else ``default``."""

    @property
    def dynamic_typing(self) -> bool:
        """String lists are typed by the node, not by rclpy: ``ros2 param set ... "[]"``
        sends an empty list as a bool array, which rclpy would refuse with a type number
        instead of the node's reason (:func:`check_value`)."""
        return self.type == ParameterType.PARAMETER_STRING_ARRAY

    def descriptor(self) -> ParameterDescriptor:
        text = self.description
        if self.choices:
            text += f" (one of: {', '.join(self.choices)})"
        descriptor = ParameterDescriptor(name=self.name, type=self.type, description=text,
                                         read_only=self.read_only,
                                         dynamic_typing=self.dynamic_typing)
        if self.int_range:
            descriptor.integer_range = [IntegerRange(from_value=self.int_range[0],
                                                     to_value=self.int_range[1], step=1)]
        if self.float_range:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)]
        return descriptor


_STRING = ParameterType.PARAMETER_STRING
_STRINGS = ParameterType.PARAMETER_STRING_ARRAY
_BOOL = ParameterType.PARAMETER_BOOL
_INT = ParameterType.PARAMETER_INTEGER
_DOUBLE = ParameterType.PARAMETER_DOUBLE

PARAMETERS = (
    ParameterSpec('backend', 'local', _STRING,
                  "Where the model runs: 'local' (in this process) or 'openai' (an "
                  'OpenAI-compatible server such as vLLM or SGLang, at server_url)',
                  read_only=True, choices=BACKENDS),
    ParameterSpec('model_path', '', _STRING,
                  "Qwen3-VL checkpoint directory (merged bf16 or pre-quantized 4-bit); "
                  "'default': the project's tiny synthetic-scenes model (balls, boxes, cones, "
                  'rings only), unpacked and quantized on first use. With backend openai: '
                  'optional, the served model\'s folder, read only for its trained prompt and '
                  'pixel budget', read_only=True),
    ParameterSpec('server_url', '', _STRING,
                  'backend openai: the API base URL, e.g. http://gpu-box:8000/v1 '
                  '(https:// works)', read_only=True),
    ParameterSpec('server_model', '', _STRING,
                  "backend openai: the served model's name ('' = the server's only model)",
                  read_only=True),
    ParameterSpec('server_api_key_env', '', _STRING,
                  'backend openai: the NAME of an environment variable holding the API key '
                  "('' = none); the key itself is never a parameter and never logged",
                  read_only=True),
    ParameterSpec('server_timeout_s', 30.0, _DOUBLE,
                  'backend openai: seconds a request may take before it counts as failed',
                  read_only=True, float_range=(0.1, 3600.0)),
    ParameterSpec('server_max_in_flight', 4, _INT,
                  'backend openai: most requests in flight at once (and one per camera)',
                  read_only=True, int_range=(1, 256)),
    ParameterSpec('device', 'auto', _STRING, f'Where the model runs: {DEVICES_HELP}',
                  read_only=True),
    ParameterSpec('quantization', 'auto', _STRING,
                  "Quantization on load: 'auto' = NF4 on CUDA unless the checkpoint is already "
                  "4-bit, as is on CPU", read_only=True, choices=QUANTIZATIONS),
    ParameterSpec('decoder', 'auto', _STRING,
                  "Generation loop: 'auto' = 'fast' (static-cache decoder, CUDA-graphed on a "
                  "GPU, eager on the CPU) or 'hf' (transformers' generate)", read_only=True,
                  choices=DECODERS),
    ParameterSpec('cpu_threads', 0, _INT,
                  "torch's threads for a model on the CPU: 0 = auto (1 for a model under 100 M "
                  'parameters such as the default model, else one per core)', read_only=True,
                  int_range=(0, 1024)),
    ParameterSpec('min_pixels', pixel_budget.NODE_MIN_PIXELS, _INT,
                  'Smallest image area fed to the model, in pixels (visual-token budget: '
                  '1 token per 32x32 pixels). Unset: what a model fine-tuned by the tools was '
                  'trained at, else the default', read_only=True, int_range=(1024, 16777216)),
    ParameterSpec('max_pixels', pixel_budget.NODE_MAX_PIXELS, _INT,
                  'Largest image area fed to the model, in pixels (640x480 = 300 tokens). '
                  'Unset: as min_pixels', read_only=True, int_range=(1024, 16777216)),
    ParameterSpec('categories', list(ARTICLE_CATEGORIES), _STRINGS,
                  'Object categories to detect (non-empty, names without quotes or commas). '
                  "Unset: what the model was trained to find, else the article's office "
                  'categories', from_model=True),
    ParameterSpec('describe', True, _BOOL,
                  'Ask for attributes of each object and publish them on descriptions',
                  from_model=True),
    ParameterSpec('attributes', list(DEFAULT_ATTRIBUTES), _STRINGS,
                  'Attribute names asked for when describe is true', from_model=True),
    ParameterSpec('prompt_template', '', _STRING,
                  "Instruction override ('' = built in); must contain {categories}, may contain "
                  '{attributes}', from_model=True),
    ParameterSpec('coordinate_convention', GRID_1000, _STRING,
                  'How the model writes boxes', choices=CONVENTIONS),
    ParameterSpec('max_new_tokens', 512, _INT, 'Longest answer the model may write',
                  int_range=(1, 8192)),
    ParameterSpec('score_threshold', 0.3, _DOUBLE,
                  'Detections scoring below this are dropped (score: geometric mean of the '
                  "probabilities of the tokens of the object's box numbers and label)",
                  float_range=(0.0, 1.0)),
    ParameterSpec('dedupe_iou', 0.7, _DOUBLE,
                  'Same-label boxes overlapping more than this IoU are merged',
                  float_range=(0.01, 1.0)),
    ParameterSpec('max_rate_hz', 0.0, _DOUBLE,
                  'Most inferences per second (0 = as fast as the model goes)',
                  float_range=(0.0, 1000.0)),
    ParameterSpec('enabled', True, _BOOL, 'Run inference (false: frames are ignored)'),
    ParameterSpec('image_topics', ['image'], _STRINGS,
                  'Camera topics; frames of several cameras that are ready together are '
                  'decoded as one batch, results share the output topics (headers tell the '
                  'cameras apart)', read_only=True),
    ParameterSpec('input_transport', 'raw', _STRING,
                  "Subscribe to each image topic (sensor_msgs/Image) or to <topic>/compressed",
                  read_only=True, choices=TRANSPORTS),
    ParameterSpec('input_reliability', 'best_effort', _STRING,
                  'Camera subscription reliability (best_effort accepts every publisher)',
                  read_only=True, choices=RELIABILITIES),
    ParameterSpec('use_cv_bridge', True, _BOOL,
                  'Convert raw images with cv_bridge when it is importable (after the checks of '
                  "size, step and encoding); false or without cv_bridge: the built-in converter",
                  read_only=True),
    ParameterSpec('max_image_pixels', 16777216, _INT,
                  'Incoming images larger than this are rejected and counted',
                  read_only=True, int_range=(1, 268435456)),
    ParameterSpec('autostart', True, _BOOL,
                  'Configure (load the model) and activate at start-up; false: stay unconfigured '
                  'for a lifecycle manager', read_only=True),
    ParameterSpec('use_depth', False, _BOOL,
                  'Subscribe to depth (registered to the colour image, 16UC1 mm or 32FC1 m) and '
                  'camera_info, and publish detections_3d and markers (one camera only)',
                  read_only=True),
    ParameterSpec('depth_max_skew_s', 0.05, _DOUBLE,
                  'Largest stamp difference between a colour frame and its depth frame; frames '
                  'without one are published 2D-only and counted', read_only=True,
                  float_range=(0.0, 10.0)),
    ParameterSpec('depth_box_fraction', 0.6, _DOUBLE,
                  "Central part of each box (of its width and height) whose depth is the "
                  "object's", float_range=(0.05, 1.0)),
)

SPECS: Dict[str, ParameterSpec] = {spec.name: spec for spec in PARAMETERS}

SETTINGS_PARAMETERS = ('categories', 'describe', 'attributes', 'prompt_template',
                       'coordinate_convention', 'max_new_tokens', 'score_threshold',
                       'dedupe_iou')


def trained_pixel_budget(model_path: str) -> Dict[str, int]:
    """``{'min_pixels', 'max_pixels'}`` a model fine-tuned by the project's tools was trained
    at (it has a detection_prompt.json; the budget is in its preprocessor_config.json), else
    empty: a stock checkpoint's processor budget (up to 16 M pixels) is no node default."""
    budget = pixel_budget.trained_pixel_budget(model_path)
    if not budget:
        return {}
    values = dict(zip(('min_pixels', 'max_pixels'), budget))
    # Kept inside the parameters' ranges, so that a model trained at an unusual budget still
    # starts (the user set nothing that could be refused).
    return {name: min(max(value, SPECS[name].int_range[0]), SPECS[name].int_range[1])
            for name, value in values.items()}


def declare_parameters(node, names=None, defaults: Optional[Dict[str, Any]] = None) -> None:
    """Declare the parameters named in ``names`` (default: all) that are not declared yet;
    ``from_model`` ones without a value (by type, or dynamically typed and unset), so that
    they read as unset until :func:`unset_model_values` fills them. ``defaults`` replace the
    specs' defaults."""
    defaults = defaults or {}
    for spec in PARAMETERS:
        if (names is not None and spec.name not in names) or node.has_parameter(spec.name):
            continue
        default = spec.default
        if spec.from_model:
            default = None if spec.dynamic_typing else Parameter.Type(spec.type)
        node.declare_parameter(spec.name, defaults.get(spec.name, default), spec.descriptor())


def startup_problems(values: Dict[str, Any]) -> Optional[str]:
    """The first reason the read-only/start-up values are unusable, or None."""
    for spec in PARAMETERS:
        if spec.name in values and values[spec.name] is not None:
            reason = check_value(spec.name, values[spec.name])
            if reason:
                return reason
    low, high = values['min_pixels'], values['max_pixels']
    if low is not None and high is not None and low > high:
        return 'min_pixels must not exceed max_pixels'
    if not values['image_topics'] or not all(values['image_topics']):
        return 'image_topics must name at least one topic, none empty'
    if values.get('use_depth') and len(values['image_topics']) > 1:
        return 'use_depth takes one camera: image_topics must name one topic'
    if values.get('backend') == 'openai':
        url = (values.get('server_url') or '').strip()
        if not url:
            return 'backend openai needs server_url (e.g. http://gpu-box:8000/v1)'
        if not url.startswith(('http://', 'https://')):
            return f'server_url must start with http:// or https://, not {url!r}'
    return None


def unset_model_values(model_path: str, unset) -> Tuple[Dict[str, Any], bool]:
    """Values for the unset ``from_model`` parameters named in ``unset``: what the model was
    fine-tuned with (its detection_prompt.json), else the defaults. Returns the values and
    whether they came from the model. Raises ValueError for a malformed
    detection_prompt.json."""
    record = read_prompt_file(model_path) if model_path else None
    trained = {}
    if record is not None:
        trained = {'categories': list(record['categories']),
                   'describe': bool(record.get('describe', False)),
                   'prompt_template': record.get('prompt_template') or ''}
        if record.get('attributes'):
            trained['attributes'] = list(record['attributes'])
    values = {name: trained.get(name, SPECS[name].default) for name in unset}
    return values, record is not None


def check_value(name: str, value: Any) -> Optional[str]:
    """Rules beyond rclpy's type/range checks, and the type of the dynamically typed string
    lists; returns the reason a value is refused."""
    spec = SPECS.get(name)
    if spec is None:
        return None
    if spec.dynamic_typing:
        return _string_list_problem(name, value)
    if spec.choices and value not in spec.choices:
        return f"{name} must be one of {', '.join(spec.choices)}, not {value!r}"
    return None


# String lists that must not be empty, and what to do instead; attributes may be empty
# (with describe false: the prompt builder says so otherwise).
_NON_EMPTY = {'categories': 'give at least one category name',
              'image_topics': 'give at least one camera topic'}


def _string_list_problem(name: str, value: Any) -> Optional[str]:
    """An empty array of any element type stands for the empty list (``ros2 param set ...
    "[]"`` sends a bool array); anything else must be a list of strings."""
    if value is None:
        return f'{name} must be set (a list of strings)'
    if isinstance(value, str):
        return (f'{name} must be a list of strings, not str {value!r} (on the command line: '
                f'-p "{name}:=[{value}]")')
    if isinstance(value, bytes) or not hasattr(value, '__len__'):
        return f'{name} must be a list of strings, not {type(value).__name__} {value!r}'
    if len(value) == 0:
        return f'{name} must not be empty: {_NON_EMPTY[name]}' if name in _NON_EMPTY else None
    if not all(isinstance(item, str) for item in value):
        return f'{name} must be a list of strings, not {list(value)!r}'
    return None


def settings_from_values(values: Dict[str, Any]) -> DetectionSettings:
    """DetectionSettings from parameter values (missing names take their defaults)."""
    def get(name):
        value = values.get(name)
        return SPECS[name].default if value is None else value
    return DetectionSettings(
        categories=tuple(get('categories')),
        describe=bool(get('describe')),
        attributes=tuple(get('attributes')),
        prompt_template=get('prompt_template') or None,
        coordinate_convention=get('coordinate_convention'),
        max_new_tokens=int(get('max_new_tokens')),
        score_threshold=float(get('score_threshold')),
        dedupe_iou=float(get('dedupe_iou')),
    )
