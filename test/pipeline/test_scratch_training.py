"""Scratch training of scene models: targets, the exact compact loss, the export, packing."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
from qwen_vl_perception.data.labels import GroundTruthObject  # noqa: E402
from qwen_vl_perception.pipeline import scratch_training as scratch  # noqa: E402
from qwen_vl_perception.model.default_model import (DefaultModelError,  # noqa: E402
                                                    ensure_default_model, pack_checkpoint,
                                                    read_manifest, unpack_checkpoint)

SMALL = scratch.ScratchTrainingConfig(hidden=64, layers=1, vision_depth=1, steps=3, scenes=6,
                                      batch_size=2, warmup=1, log_every=1, max_objects=2)


def test_scene_answer_lists_objects_in_reading_order_with_rounded_grid_boxes():
    objects = [GroundTruthObject('ring', (200.0, 120.0, 260.0, 180.0), {'color': 'red'}),
               GroundTruthObject('ball', (10.0, 20.0, 70.0, 80.0), {'color': 'blue'})]
    answer = scratch.scene_answer(objects, 400, 300, box_step=25)
    parsed = json.loads(answer.strip().removeprefix('```json').removesuffix('```'))
    assert [o['label'] for o in parsed] == ['ball', 'ring']
    assert parsed[0]['bbox_2d'] == [25, 75, 175, 275]  # 20/300*1000 = 66.7 -> 75
    assert parsed[1]['bbox_2d'] == [500, 400, 650, 600]
    assert parsed[0]['color'] == 'blue'
    assert scratch.scene_answer(objects, 400, 300, box_step=1) != answer


def test_position_table_encodes_both_axes():
    table = scratch.sincos_position_table(torch, 16, 10, 1.0)
    assert table.shape == (16, 10)
    assert table[0, 0] == -1 and table[3, 0] == 1 and table[12, 1] == 1  # x ramp, y ramp
    assert len({tuple(row.tolist()) for row in table}) == 16


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp('scratch') / 'model'
    lines = []
    result = scratch.train_from_scratch(out, SMALL, log=lines.append)
    return out, result, lines


def test_training_exports_a_plain_checkpoint_with_only_used_rows_non_zero(trained):
    from transformers import Qwen3VLForConditionalGeneration
    out, result, lines = trained
    assert result['steps'] == 3 and any(line.startswith('step 2 ') for line in lines)
    model = Qwen3VLForConditionalGeneration.from_pretrained(out)
    embedding = model.get_input_embeddings().weight
    assert int((embedding.abs().sum(1) > 0).sum()) == result['used_tokens']
    assert model.lm_head.weight.data_ptr() == embedding.data_ptr()  # tied
    prompt = json.loads((out / 'detection_prompt.json').read_text())
    assert prompt['categories'] == ['ball', 'box', 'cone', 'ring']
    assert json.loads((out / 'preprocessor_config.json').read_text())['size'] == {
        'shortest_edge': SMALL.min_pixels, 'longest_edge': SMALL.max_pixels}


def test_compact_loss_equals_the_full_vocabulary_loss_of_the_exported_model(trained):
    """The trick the trainer rests on: over the K used rows it computes exactly the
    151,936-way cross entropy transformers computes for the saved checkpoint."""
    from transformers import Qwen3VLForConditionalGeneration
    from qwen_vl_perception.model.processor import InputBuilder
    from qwen_vl_perception.pipeline.training import training_batch
    out, _, _ = trained
    model = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    builder = InputBuilder.from_pretrained(out)
    prompt = scratch.scene_prompt()
    scene = scratch.make_scene(SMALL, 99, 0)
    batch = training_batch(builder, [scene.image], [prompt.instruction],
                           [scratch.scene_answer(scene.objects, scene.image.shape[1],
                                                 scene.image.shape[0])])
    with torch.no_grad():
        full = model(**batch).loss
        labels = batch.pop('labels')
        hidden = model.model(**batch).last_hidden_state
    used = scratch.used_token_ids(builder, prompt)
    CompactEmbedding, _ = scratch.training_modules(torch)
    compact = CompactEmbedding(used, model.config.text_config.vocab_size, SMALL.hidden)
    compact.weight.data.copy_(model.get_input_embeddings().weight[compact.used])
    with torch.no_grad():
        exact = scratch.exact_loss(torch, hidden, labels, compact,
                                   model.config.text_config.vocab_size - len(used))
    assert float(exact) == pytest.approx(float(full), rel=1e-5)


def test_every_answer_token_is_a_used_row():
    from qwen_vl_perception.model.processor import InputBuilder
    from qwen_vl_perception.model.checkpoint_files import write_input_files
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        write_input_files(folder)
        builder = InputBuilder.from_pretrained(folder)
        used = set(scratch.used_token_ids(builder, scratch.scene_prompt()))
        for index in range(20):
            scene = scratch.make_scene(scratch.ScratchTrainingConfig(), 5, index)
            answer = scratch.scene_answer(scene.objects, scene.image.shape[1],
                                          scene.image.shape[0])
            assert set(builder.tokenizer(answer)['input_ids']) <= used


def test_pack_and_unpack_round_trip(trained, tmp_path):
    from safetensors.torch import load_file
    out, _, _ = trained
    packed = pack_checkpoint(out, tmp_path / 'packed', {'figures': {'precision': 0.5}})
    assert read_manifest(packed)['figures'] == {'precision': 0.5}
    original = load_file(str(out / 'model.safetensors'))
    size = (packed / 'weights.safetensors').stat().st_size
    assert size < 0.2 * (out / 'model.safetensors').stat().st_size
    restored_dir = unpack_checkpoint(packed, tmp_path / 'restored')
    restored = load_file(str(restored_dir / 'model.safetensors'))
    assert set(restored) == set(original)
    for key, value in original.items():
        assert torch.allclose(restored[key], value, rtol=1e-3, atol=1e-4), key
    for name in ('config.json', 'detection_prompt.json', 'preprocessor_config.json'):
        assert json.loads((restored_dir / name).read_text()) == json.loads(
            (out / name).read_text())


def test_ensure_default_model_builds_once_and_reports_a_missing_package(trained, tmp_path):
    out, _, _ = trained
    packed = pack_checkpoint(out, tmp_path / 'packed')
    messages = []
    first = ensure_default_model('none', packed_dir=packed, cache=tmp_path / 'cache',
                                 log=messages.append)
    again = ensure_default_model('none', packed_dir=packed, cache=tmp_path / 'cache',
                                 log=messages.append)
    assert first == again and (first / 'config.json').is_file()
    assert len(messages) == 1 and not list(first.parent.glob('float32.*'))
    killed = first.parent / 'float32.abandoned'  # what a build killed midway leaves
    recent = first.parent / 'float32.running'  # another process's build in progress
    killed.mkdir()
    recent.mkdir()
    os.utime(killed, (0, 0))
    shutil.rmtree(first)
    ensure_default_model('none', packed_dir=packed, cache=tmp_path / 'cache',
                         log=messages.append)
    assert not killed.exists() and recent.exists()
    with pytest.raises(DefaultModelError, match='make_default_model'):
        ensure_default_model(packed_dir=tmp_path / 'nothing', cache=tmp_path / 'cache')


def test_the_packed_default_model_is_in_the_package_with_its_figures():
    manifest = read_manifest()
    figures = manifest['figures']
    assert manifest['prompt']['categories'] == ['ball', 'box', 'cone', 'ring']
    assert {'scratch', 'lora', 'nf4', 'merged_float32', 'recipe'} <= set(figures)
    assert np.isfinite(figures['scratch']['final_loss_smoothed'])
