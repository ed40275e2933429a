"""The parts of ``tools/benchmark.py``, one module for each thing it owns."""
