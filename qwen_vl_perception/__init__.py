"""Open-vocabulary ROS 2 detection with a 4-bit quantized Qwen3-VL."""

__version__ = "0.1.0"
