"""tools/make_default_model.py runs its whole recipe (a few steps of each stage) and packs a
model that the node's default-model path can unpack and quantize."""
import json
import subprocess
import sys

import pytest

from locations import REPO_ROOT

pytest.importorskip('torch')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')
from qwen_vl_perception.model.default_model import ensure_default_model  # noqa: E402

ROOT = REPO_ROOT


def test_recipe_runs_every_stage_and_packs_a_usable_model(tmp_path):
    artifact = tmp_path / 'artifact'
    command = [sys.executable, str(ROOT / 'tools' / 'make_default_model.py'),
               '--work', str(tmp_path / 'work'), '--artifact', str(artifact),
               '--steps', '3', '--scenes', '8', '--lora-steps', '2', '--lora-scenes', '8',
               '--eval-scenes', '4']
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((artifact / 'manifest.json').read_text())['figures']
    assert figures['scratch']['steps'] == 3 and figures['lora']['steps'] == 2
    for stage in ('base_float32', 'merged_float32', 'merged_bfloat16', 'nf4'):
        assert figures[stage]['images'] == 4, stage
    assert figures['shipped']['nf4']['images'] == 4  # the packed model, as the node gets it
    agreement = figures['shipped']['nf4_vs_bfloat16_detections']
    assert set(agreement) == {'precision', 'recall', 'color_agreement'}
    assert '--steps 3' in figures['recipe']['command']
    work = tmp_path / 'work'
    assert (work / 'adapter' / 'adapter_model.safetensors').is_file()
    assert (work / 'nf4' / 'config.json').is_file()

    model = ensure_default_model(packed_dir=artifact, cache=tmp_path / 'cache',
                                 log=lambda message: None)
    config = json.loads((model / 'config.json').read_text())
    assert config['quantization_config']['bnb_4bit_quant_type'] == 'nf4'

    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and 'not empty' in again.stderr
