"""Model side of the core: configs, input building, loading and generation.

Importing this package does not import torch; the modules that need it say so clearly
(see ``qwen_vl_perception.model.torch_support``).
"""
