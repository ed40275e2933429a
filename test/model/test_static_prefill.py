"""The static prefill (the prompt straight into the decode session's static cache, graphed per
shape on CUDA) computes what the model's own forward computes: on the CPU its eager form
against the model's forward and ``model.generate`` (tiny Qwen3-VL, float32); on CUDA the
graphed form against the model's own prefill path (skipped without a GPU)."""
import warnings

import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from qwen_vl_perception.model.decode_session import DecodeSession, StepKernels  # noqa: E402
from qwen_vl_perception.model.fast_decode import FastGreedyDecoder  # noqa: E402
from qwen_vl_perception.model.generation import hf_decode  # noqa: E402
from qwen_vl_perception.model.qwen3_vl_prefill import prefill, text_model_parts  # noqa: E402
from qwen_vl_perception.model.static_prefill import StaticPrefill, frame_inputs  # noqa: E402

from decoding import STOPS, assert_same, make_inputs, tiny_model  # noqa: E402
from trained_models import linears_to_nf4  # noqa: E402

IMAGES = [(5, 7, (1, 4, 6))]
LEFT_PADDED = [(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8)), (9, 1, (1, 4, 4))]
TEXT = [(11, 0, None), (6, 0, None)]


@pytest.fixture(scope='module')
def model():
    return tiny_model()


def static_prefill(model, tensors, bucket, cache_len=128, vision_tables=True, kernels=None):
    """The eager static prefill of ``tensors`` into a fresh session: (session, frame, logits).
    ``vision_tables=False``: the vision tower its own way (as without transformers' tables);
    ``kernels``: the layers' elementwise work through these StepKernels."""
    parts = text_model_parts(model)
    device = parts.embed_tokens.weight.device
    frame = frame_inputs(model, parts, tensors, bucket, cache_len)
    session = DecodeSession(torch, model, parts, frame.input_ids.shape[0], cache_len,
                            parts.embed_tokens.weight.dtype, device, StepKernels(torch, False))
    shape = StaticPrefill(torch, model, parts, session, frame, kernels)
    assert shape.vision_in_graph
    if not vision_tables:
        shape.vision_kwargs = None
        assert shape.vision_in_graph == (shape.visual is None)
    shape.load(frame)
    shape.run()
    return session, frame, shape.logits


@pytest.mark.parametrize('prompts', [IMAGES, LEFT_PADDED, TEXT], ids=['image', 'padded', 'text'])
@pytest.mark.parametrize('bucket', [1, 16])
@pytest.mark.parametrize('vision_tables', [True, False], ids=['tables', 'own-way'])
def test_static_prefill_matches_the_models_forward(model, prompts, bucket, vision_tables):
    """Same last logits, the same keys and values at every real position, the same positions,
    with and without padding the prompt to a length bucket, the vision tower with its tables
    made ahead (as graphed) or its own way."""
    tensors = make_inputs(prompts)
    with torch.inference_mode():
        logits, cache, positions = prefill(model, dict(tensors))
        session, frame, static_logits = static_prefill(model, tensors, bucket,
                                                       vision_tables=vision_tables)
    length = tensors['input_ids'].shape[1]
    assert frame.length == length and frame.padded_length == -(-length // bucket) * bucket
    assert torch.equal(frame.last_positions, positions[:, :, -1])
    assert torch.equal(static_logits.argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(static_logits, logits, rtol=1e-5, atol=1e-5)
    real = tensors['attention_mask'].bool()
    for layer, (keys, values) in enumerate(zip(session.keys, session.values)):
        for ours, theirs in ((keys, cache.layers[layer].keys),
                             (values, cache.layers[layer].values)):
            torch.testing.assert_close(ours[:, :, :length].transpose(1, 2)[real],
                                       theirs.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)


class CountingKernels(StepKernels):
    """Uncompiled StepKernels that count their norm, add + norm and SiLU x up calls."""

    def __init__(self):
        super().__init__(torch, False)
        self.calls = {'rms_norm': 0, 'add_rms_norm': 0, 'act_mul': 0}
        for name in ('rms_norm', 'add_rms_norm'):
            setattr(self, name, self._counted(name, getattr(self, name)))

    def _counted(self, name, function):
        def counted(*args):
            self.calls[name] += 1
            return function(*args)
        return counted

    def act_mul(self, mlp, gate, up):
        self.calls['act_mul'] += 1
        return super().act_mul(mlp, gate, up)


@pytest.fixture(scope='module')
def deeper_model():
    """The tiny model with four layers (more than its deepstack additions) and norm weights
    that differ from 1 and from each other, so that a norm applied with another's weight
    shows."""
    from qwen_vl_perception.model.configs import tiny_config
    config = tiny_config()
    config['text_config'].update(initializer_range=0.1, num_hidden_layers=4)
    torch.manual_seed(3)
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config))
    with torch.no_grad():
        for module in model.model.language_model.modules():
            if type(module).__name__.endswith('RMSNorm'):
                module.weight.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize('prompts', [IMAGES, LEFT_PADDED, TEXT], ids=['image', 'padded', 'text'])
def test_layers_through_the_step_kernels_give_the_bits_of_the_models_layers(deeper_model,
                                                                            prompts):
    """The prefill's layers with their norms, residual adds and SiLU x up through StepKernels
    (uncompiled here: the same operations regrouped) write the same cache and logits, bit for
    bit, as the model's own layers, deepstack additions included; every norm, add and
    activation goes through the kernels."""
    model = deeper_model
    deepstack = len(model.model.visual.deepstack_visual_indexes)
    layers = len(model.model.language_model.layers)
    assert 0 < deepstack < layers - 1  # layers with deepstack after them, and layers without
    tensors = make_inputs(prompts)
    kernels = CountingKernels()
    with torch.inference_mode():
        session, _, logits = static_prefill(model, tensors, 16)
        through, _, through_logits = static_prefill(model, tensors, 16, kernels=kernels)
    assert torch.equal(through_logits, logits)
    for ours, theirs in zip(through.keys + through.values, session.keys + session.values):
        assert torch.equal(ours, theirs)
    separate = deepstack if prompts is not TEXT else 0  # layers whose add stays apart
    assert kernels.calls == {'rms_norm': 1 + separate, 'act_mul': layers,
                             'add_rms_norm': 2 * layers - 1 - separate}


@pytest.mark.parametrize('prompts', [IMAGES, LEFT_PADDED, TEXT], ids=['image', 'padded', 'text'])
def test_decoder_with_the_static_prefill_gives_generate_tokens(model, prompts):
    inputs = make_inputs(prompts)
    reference = hf_decode(model, inputs, 16, STOPS)
    decoder = FastGreedyDecoder(static_prefill=True)
    assert_same(reference, decoder(model, inputs, 16, STOPS))
    assert decoder.last_timing.prefill == 'static'
    assert decoder.session_count == 1


def test_a_decoder_fusing_its_prefill_hands_the_shape_its_sessions_kernels(model):
    """``fuse_prefill``: each prefill shape gets its session's step kernels (unfused on the
    CPU: the tokens stay generate's); by default none."""
    inputs = make_inputs(LEFT_PADDED)
    for fuse_prefill in (False, True):
        decoder = FastGreedyDecoder(static_prefill=True, fuse_prefill=fuse_prefill)
        assert_same(hf_decode(model, inputs, 8, STOPS), decoder(model, inputs, 8, STOPS))
        session = decoder._last_session()
        shape, = session.prefills.values()
        assert shape.kernels is (session.kernels if fuse_prefill else None)


def test_a_failing_prefill_through_the_step_kernels_falls_back_to_the_models_layers(
        model, monkeypatch):
    """A failure of the layers through the step kernels (a compile error, dynamo's recompile
    limit) is warned about once; the static prefill goes on with the model's layers, for later
    shapes too."""
    def fail(*args):
        raise RuntimeError('no kernel for this shape')
    monkeypatch.setattr(StaticPrefill, '_layers_through_kernels', fail)
    inputs = make_inputs(LEFT_PADDED)
    decoder = FastGreedyDecoder(static_prefill=True, fuse_prefill=True)
    with pytest.warns(RuntimeWarning, match='through the step kernels failed'):
        tokens = decoder(model, inputs, 8, STOPS)
    assert_same(hf_decode(model, inputs, 8, STOPS), tokens)
    assert decoder.kernel_choices.prefill_fusion_failed
    assert decoder.last_timing.prefill == 'static'
    shape, = decoder._last_session().prefills.values()
    assert shape.kernels is None and not decoder.last_prefill_fused
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no second warning, no second attempt
        decoder(model, make_inputs(IMAGES), 8, STOPS)


def test_the_length_bucket_does_not_change_the_answer(model):
    inputs = make_inputs(LEFT_PADDED, seed=7)
    results = [FastGreedyDecoder(static_prefill=True, prefill_bucket=bucket)(
        model, inputs, 12, []) for bucket in (1, 7, 64, 1000)]
    for result in results[1:]:
        assert_same(results[0], result)


def test_nf4_model_with_the_static_prefill_gives_generate_tokens():
    pytest.importorskip('bitsandbytes')
    model = tiny_model(seed=2)
    assert linears_to_nf4(model) > 0
    inputs = make_inputs(LEFT_PADDED[:2])
    assert_same(hf_decode(model, inputs, 8, STOPS),
                FastGreedyDecoder(static_prefill=True)(model, inputs, 8, STOPS),
                prob_tolerance=1e-4)


def test_on_the_cpu_the_default_is_the_models_own_prefill(model):
    decoder = FastGreedyDecoder()
    decoder(model, make_inputs(IMAGES), 4, STOPS)
    assert decoder.last_timing.prefill == 'model'
    decoder = FastGreedyDecoder(static_prefill=False)
    decoder(model, make_inputs(IMAGES), 4, STOPS)
    assert decoder.last_timing.prefill == 'model'


def test_frame_inputs_leave_videos_to_the_models_own_prefill(model):
    """What the static prefill does not cover is not an error: ``frame_inputs`` says None, on
    which the decoder runs the model's own forward (``fast_decode``'s static prefill step)."""
    parts = text_model_parts(model)
    tensors = make_inputs(IMAGES)
    assert frame_inputs(model, parts, tensors, 16, 128) is not None
    tensors['pixel_values_videos'] = tensors['pixel_values']
    assert frame_inputs(model, parts, tensors, 16, 128) is None


def test_a_failing_static_prefill_that_was_asked_for_is_raised(model, monkeypatch):
    def broken(self):
        raise RuntimeError('injected failure')
    monkeypatch.setattr(StaticPrefill, 'language', broken)
    with pytest.raises(RuntimeError, match='injected'):
        FastGreedyDecoder(static_prefill=True)(model, make_inputs(IMAGES), 4, STOPS)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def on_cuda(tensors):
    return {name: value.cuda() for name, value in tensors.items()}


@cuda
@pytest.mark.parametrize('fuse_prefill', [False, True], ids=['model-layers', 'fused-layers'])
@pytest.mark.parametrize('prompts', [IMAGES, LEFT_PADDED, TEXT], ids=['image', 'padded', 'text'])
def test_graphed_prefill_gives_the_old_paths_tokens_in_float32(prompts, fuse_prefill):
    model = tiny_model(device='cuda')
    inputs = on_cuda(make_inputs(prompts))
    old = FastGreedyDecoder(static_prefill=False)
    reference = old(model, inputs, 20, STOPS)
    assert old.last_timing.prefill == 'model'
    decoder = FastGreedyDecoder(fuse_prefill=fuse_prefill)
    graphed = decoder(model, inputs, 20, STOPS)
    assert decoder.last_timing.prefill == 'graphed' and decoder.last_timing.prefill_captured
    assert decoder.last_prefill_fused == (fuse_prefill and decoder.last_session_fused)
    assert_same(reference, graphed, prob_tolerance=1e-4)
    assert_same(hf_decode(model, inputs, 20, STOPS), graphed, prob_tolerance=1e-3)
    other = on_cuda(make_inputs(prompts, seed=9))  # same shape, other tokens and pixels
    again = decoder(model, other, 20, STOPS)
    assert decoder.last_timing.prefill == 'graphed'
    assert not decoder.last_timing.prefill_captured  # replayed
    assert_same(old(model, other, 20, STOPS), again, prob_tolerance=1e-4)


def nf4_on_cuda(model, compute_dtype):
    """The language model's linears as bitsandbytes NF4 layers on the GPU."""
    assert linears_to_nf4(model, device='cuda', compute_dtype=compute_dtype) > 0
    return model


@cuda
@pytest.mark.parametrize('fuse_prefill', [False, True], ids=['model-layers', 'fused-layers'])
@pytest.mark.parametrize('weights', ['bf16', 'nf4'])
def test_graphed_prefill_agrees_with_the_old_path_in_bf16(weights, fuse_prefill):
    """bf16 rounds differently when the prompt is padded to its bucket (other matmul shapes):
    the first tokens and nearly all teacher-forced choices agree."""
    model = tiny_model(dtype=torch.bfloat16, device='cuda')
    if weights == 'nf4':
        pytest.importorskip('bitsandbytes')
        nf4_on_cuda(model, torch.bfloat16)
    inputs = on_cuda(make_inputs(LEFT_PADDED))
    old = FastGreedyDecoder(static_prefill=False)
    reference, _ = old(model, inputs, 32, [])
    decoder = FastGreedyDecoder(fuse_prefill=fuse_prefill)
    graphed, _ = decoder(model, inputs, 32, [])
    assert decoder.last_timing.prefill == 'graphed'
    assert decoder.last_prefill_fused == (fuse_prefill and decoder.last_session_fused)
    assert [row[0] for row in graphed] == [row[0] for row in reference]
    forced = decoder.choices_given(model, inputs, reference)
    agreed = sum(a == b for row, other in zip(forced, reference) for a, b in zip(row, other))
    print(f'{weights}: teacher-forced agreement {agreed / (32 * len(reference)):.3f}')
    assert agreed >= 0.9 * 32 * len(reference)


@cuda
def test_a_failing_graphed_prefill_warns_once_and_falls_back(monkeypatch):
    model = tiny_model(device='cuda')
    inputs = on_cuda(make_inputs(LEFT_PADDED))
    reference = FastGreedyDecoder(static_prefill=False)(model, inputs, 12, STOPS)
    original = StaticPrefill.capture

    def broken(self, stream, pool):
        original(self, stream, pool)
        raise RuntimeError('injected failure')
    monkeypatch.setattr(StaticPrefill, 'capture', broken)
    decoder = FastGreedyDecoder()
    with pytest.warns(RuntimeWarning, match='static prefill failed'):
        first = decoder(model, inputs, 12, STOPS)
    assert decoder.kernel_choices.static_prefill_failed
    assert decoder.last_timing.prefill == 'model'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        second = decoder(model, inputs, 12, STOPS)
    assert_same(reference, first, prob_tolerance=1e-4)
    assert first == second
