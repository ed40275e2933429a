"""What perception_node reads before it runs: its parameters, the model folder, the engine.

Parameters are declared and checked when the node is constructed (a bad params file stops it
there, in every lifecycle state); the engine is made in :func:`create_engine` on configure.
"""
from typing import Any, Callable, Dict

from rcl_interfaces.msg import ParameterType
from rclpy.exceptions import InvalidParameterTypeException, ParameterException
from rclpy.parameter import Parameter

from ..detector import DetectionSettings, prepare_settings
from ..model.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from .parameters import (PARAMETERS, SETTINGS_PARAMETERS, declare_parameters,
                         settings_from_values, startup_problems, trained_pixel_budget,
                         unset_model_values)


class StartupError(RuntimeError):
    """The node cannot start (bad parameters, model missing); the message says why."""


def value(node, name: str) -> Any:
    return node.get_parameter(name).value


def declare_and_check(node) -> str:
    """Declare every parameter (unset prompt ones filled from the model's training prompt)
    and check them; returns the model folder ('default' resolved). Raises StartupError."""
    try:
        declare_parameters(node, names=('model_path', 'quantization', 'backend'))
        model_dir = resolve_model_dir(node)
        budget = trained_pixel_budget(model_dir)
        declare_parameters(node, defaults=budget)
    except ParameterException as error:  # a wrong type or range in a params file
        double = any(spec.type == ParameterType.PARAMETER_DOUBLE and spec.name in str(error)
                     for spec in PARAMETERS)
        hint = (' (a double needs a decimal point, e.g. 2.0)'
                if isinstance(error, InvalidParameterTypeException) and double else '')
        raise StartupError(f'invalid parameter: {error}{hint}') from error
    problem = startup_problems({spec.name: node.get_parameter_or(spec.name).value
                                for spec in PARAMETERS})
    if problem:
        raise StartupError(problem)
    if budget and all(value(node, name) == pixels for name, pixels in budget.items()):
        node.get_logger().info(
            f"the model's training resolution: min_pixels {budget['min_pixels']}, "
            f"max_pixels {budget['max_pixels']}")
    _fill_unset_prompt_parameters(node, model_dir)
    try:
        prepare_settings(current_settings(node))
    except ValueError as error:
        raise StartupError(f'invalid parameters: {error}') from error
    return model_dir


def current_settings(node) -> DetectionSettings:
    return settings_from_values({name: value(node, name) for name in SETTINGS_PARAMETERS})


def resolve_model_dir(node) -> str:
    """``model_path``, with 'default' resolved to the embedded model's NF4 checkpoint
    (unpacked and quantized into the cache on first use)."""
    path = value(node, 'model_path')
    if path == DEFAULT_MODEL_NAME:
        # a served model's folder is only read (prompt, pixel budget): no NF4 needed
        form = ('none' if value(node, 'quantization') == 'none'
                or value(node, 'backend') == 'openai' else 'nf4')
        try:
            path = str(ensure_default_model(form, log=node.get_logger().info))
        except Exception as error:  # any failure to unpack/quantize stops start-up
            raise StartupError(f'default model: {type(error).__name__}: {error}') from error
    return path


def _fill_unset_prompt_parameters(node, model_dir: str) -> None:
    """Unset categories/describe/attributes/prompt_template: what the model was trained with
    (its detection_prompt.json), else the defaults. Values given by the user stay."""
    unset = [spec.name for spec in PARAMETERS if spec.from_model
             and node.get_parameter_or(spec.name).type_ == Parameter.Type.NOT_SET]
    if not unset:
        return
    try:
        values, from_model = unset_model_values(model_dir, unset)
    except ValueError as error:
        raise StartupError(str(error)) from error
    if from_model:
        node.get_logger().info(f"from the model's training prompt: {', '.join(unset)}")
    results = node.set_parameters([Parameter(name, value=v) for name, v in values.items()])
    for name, result in zip(values, results):
        if not result.successful:
            raise StartupError(f'{name}: {result.reason}')


def create_engine(node, model_dir: str, log: Callable[[str], None]):
    """The engine the node's parameters ask for (loaded now); StartupError if it cannot be.

    Every backend is made here, so that configure has one place that builds the engine.
    """
    if value(node, 'backend') == 'openai':
        return connect_server(node, model_dir)
    from ..model.engine import VisionLanguageEngine
    from ..model.loading import ModelLoadError
    from ..model.torch_support import MissingDependencyError, triton_missing_reason
    if not model_dir:
        raise StartupError("model_path is required (a Qwen3-VL checkpoint directory, or "
                           "'default' for the project's synthetic-scenes model), e.g. "
                           "perception_node --ros-args -p model_path:=default")
    options: Dict[str, Any] = {name: value(node, name) for name in (
        'device', 'quantization', 'decoder', 'cpu_threads', 'min_pixels', 'max_pixels')}
    log(f"loading the model {model_dir} (device {options['device']}, "
        f"quantization {options['quantization']})")
    try:
        engine = VisionLanguageEngine(model_dir, **options)
    except (ModelLoadError, MissingDependencyError, OSError, ValueError) as error:
        raise StartupError(str(error)) from error
    missing = triton_missing_reason() if engine.device.type == 'cuda' else None
    if missing:  # e.g. a JetPack torch: everything runs, the fused kernels stay off
        log(f'{missing}: decoding without the fused kernels '
            "(torch.compile, the NF4 decode kernel); bitsandbytes' path")
    return engine


def connect_server(node, model_dir: str):
    """backend openai: the served model's engine. A server that answers but refuses the key,
    does not serve ``server_model`` or is no OpenAI API stops configure; one that cannot be
    reached (or answers 5xx) does not: the node goes on and retries."""
    from ..backends.http_client import (AuthenticationError, BadAnswer, HttpStatusError,
                                        ServerError)
    from ..backends.openai_engine import OpenAIEngine, ServerModelError
    try:
        engine = OpenAIEngine.for_model(
            value(node, 'server_url'), model_dir or None,
            min_pixels=value(node, 'min_pixels'), max_pixels=value(node, 'max_pixels'),
            model=value(node, 'server_model'), api_key_env=value(node, 'server_api_key_env'),
            timeout_s=value(node, 'server_timeout_s'),
            max_in_flight=value(node, 'server_max_in_flight'))
    except ValueError as error:
        raise StartupError(str(error)) from error
    try:
        served = engine.connect()
    except (AuthenticationError, ServerModelError, BadAnswer) as error:
        hint = ''
        if isinstance(error, AuthenticationError):
            key_env = value(node, 'server_api_key_env')
            hint = (f' (the key comes from the environment variable {key_env})' if key_env
                    else ' (no key sent: set server_api_key_env to the name of an '
                    'environment variable holding it)')
        raise StartupError(f'{error}{hint}') from error
    except HttpStatusError as error:
        if error.status < 500:
            raise StartupError(str(error)) from error
        _warn_unreachable(node, engine, error)
    except ServerError as error:
        _warn_unreachable(node, engine, error)
    else:
        node.get_logger().info(f"{engine.server_url} serves {', '.join(served)}; using "
                               f'{engine.model_name!r}')
    return engine


def _warn_unreachable(node, engine, error) -> None:
    node.get_logger().warning(
        f'the server is not answering yet: {error}; starting anyway, retrying every '
        f'{engine.status.retry_in_s:.0f}-10 s (/diagnostics: WARN until it answers)')
