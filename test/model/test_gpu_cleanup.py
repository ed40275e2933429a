"""Cleanup gives the GPU memory back: ``torch.cuda.memory_allocated`` after a configure, a few
frames (CUDA graphs captured) and a cleanup is within 50 MB of what it was before configure.

Skipped without CUDA. Three measurements:

- the engine path configure/cleanup runs (the default model in NF4, the fast decoder);
- the node itself (``trigger_configure`` / ``trigger_cleanup``), where rclpy is installed;
- the Qwen3-VL-4B architecture with random weights, quantized to NF4 on load, where the GPU
  has 24 GB free (the size the figure matters for).

The last engine's cleanup also drops cuBLAS's per-stream workspaces (3 x 32 MB on an H200
after the first frames, which ``empty_cache`` keeps); while another engine is open they stay,
since its captured graphs use them.

Also a script: ``python3 test/test_gpu_cleanup.py`` prints each measurement as JSON.
"""
import gc
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
MB = 2 ** 20
LIMIT_MB = 50


def _allocated_mb() -> float:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / MB


def _frames(detector, count=3):
    from qwen_vl_perception.data.scenes import render_scene
    for index in range(count):
        scene = render_scene(np.random.default_rng([30_000, index]), 320, 240)
        detector.detect([scene.image])


def _settings(model_dir):
    from qwen_vl_perception.detector import DetectionSettings
    from qwen_vl_perception.trained_prompt import read_prompt_file
    record = read_prompt_file(model_dir)
    if record is None:
        return DetectionSettings(categories=('ball', 'box', 'cone', 'ring'), max_new_tokens=64)
    return DetectionSettings(categories=tuple(record['categories']),
                             describe=bool(record.get('describe')),
                             attributes=tuple(record.get('attributes') or ()))


def measure_engine(model_dir, quantization='auto') -> dict:
    """Before configure, while loaded (after frames), after cleanup: MB allocated."""
    from qwen_vl_perception.detector import Detector
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    before = _allocated_mb()
    engine = VisionLanguageEngine(model_dir, device='cuda', quantization=quantization)
    detector = Detector(engine, _settings(model_dir))
    _frames(detector)
    loaded = _allocated_mb()
    decoder = type(engine.decoder).__name__
    del detector
    engine.close()  # what the node's cleanup calls
    del engine
    return {'before_mb': round(before, 1), 'loaded_mb': round(loaded, 1),
            'after_cleanup_mb': round(_allocated_mb(), 1), 'decoder': decoder}


def measure_node(model_dir) -> dict:
    import random

    import rclpy
    from rclpy.parameter import Parameter

    from qwen_vl_perception.ros.node import PerceptionNode
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=random.randint(1, 200))
    try:
        node = PerceptionNode(context=context, parameter_overrides=[
            Parameter('model_path', value=str(model_dir)), Parameter('device', value='cuda'),
            Parameter('autostart', value=False)])
        before = _allocated_mb()
        node.trigger_configure()
        assert node.lifecycle_state == 'inactive'
        _frames(node.detector)
        loaded = _allocated_mb()
        node.trigger_cleanup()
        after = _allocated_mb()
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
    return {'before_mb': round(before, 1), 'loaded_mb': round(loaded, 1),
            'after_cleanup_mb': round(after, 1)}


def random_4b_checkpoint(folder: Path) -> Path:
    """The Qwen3-VL-4B architecture with random weights, saved in bf16 with the tokenizer and
    processor files (about 9 GB on disk)."""
    import transformers

    from qwen_vl_perception.model.configs import qwen3_vl_4b_config
    from qwen_vl_perception.pipeline.tiny import write_input_files
    config = transformers.Qwen3VLConfig(**qwen3_vl_4b_config())
    with torch.device('cuda'):
        model = transformers.Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    write_input_files(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


@pytest.fixture(scope='module')
def default_nf4(tmp_path_factory):
    from qwen_vl_perception.model.default_model import ensure_default_model
    return ensure_default_model('nf4', cache=tmp_path_factory.mktemp('cache'),
                                log=lambda message: None)


def _check(figures):
    print(json.dumps(figures))
    assert figures['loaded_mb'] - figures['before_mb'] > 1.0  # the model was on the GPU
    assert figures['after_cleanup_mb'] - figures['before_mb'] < LIMIT_MB, figures


def test_engine_cleanup_gives_the_default_models_memory_back(default_nf4):
    _check(measure_engine(default_nf4))


def test_node_cleanup_gives_the_memory_back(default_nf4):
    pytest.importorskip('rclpy')
    _check(measure_node(default_nf4))


def test_closing_one_engine_leaves_the_other_engines_graphs_intact(default_nf4):
    """Another engine's captured graphs still use cuBLAS workspaces, so the first engine's
    cleanup keeps them: the other engine answers as before and writes nowhere else (memory
    handed out after the cleanup keeps its contents through the other engine's frames)."""
    from qwen_vl_perception.data.scenes import render_scene
    from qwen_vl_perception.detector import Detector
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    images = [render_scene(np.random.default_rng([30_001, index]), 320, 240).image
              for index in range(2)]
    first = VisionLanguageEngine(default_nf4, device='cuda')
    second = VisionLanguageEngine(default_nf4, device='cuda')
    detector = Detector(second, _settings(default_nf4))
    Detector(first, _settings(default_nf4)).detect(images[:1])
    answers = [frame.raw_text for frame in detector.detect(images)]
    first.close()
    filler = torch.full((256 * MB,), 7, dtype=torch.uint8, device='cuda')
    assert [frame.raw_text for frame in detector.detect(images)] == answers
    torch.cuda.synchronize()
    assert bool((filler == 7).all())
    second.close()


def test_cleanup_of_the_4b_architecture_gives_its_memory_back(tmp_path):
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip('needs 24 GB of free GPU memory')
    figures = measure_engine(random_4b_checkpoint(tmp_path / 'qwen3-vl-4b-random'),
                             quantization='nf4')
    assert figures['loaded_mb'] - figures['before_mb'] > 2000  # NF4 weights: ~3.5 GB
    _check(figures)


if __name__ == '__main__':
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
    from qwen_vl_perception.model.default_model import ensure_default_model
    with tempfile.TemporaryDirectory() as work:
        model = ensure_default_model('nf4', cache=Path(work) / 'cache',
                                     log=lambda message: None)
        print('engine, default model:', json.dumps(measure_engine(model)), flush=True)
        if importlib.util.find_spec('rclpy') is not None:
            print('node, default model:', json.dumps(measure_node(model)), flush=True)
        else:
            print('node: skipped (no rclpy)', flush=True)
        print('engine, 4B architecture:', json.dumps(measure_engine(
            random_4b_checkpoint(Path(work) / '4b'), quantization='nf4')), flush=True)
