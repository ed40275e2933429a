"""Making checkpoints: LoRA fine-tuning and merging, NF4 quantization, training the default
model from scratch, the tiny test checkpoint. Tools in ``tools/`` drive it; the node never
imports it (except the default model's first-use quantization, see ``model/default_model``).
"""
