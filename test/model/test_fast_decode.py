"""FastGreedyDecoder gives exactly model.generate's greedy tokens (tiny Qwen3-VL, CPU; the
CUDA tests run where a GPU is present)."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from qwen_vl_perception.model.fast_decode import FastGreedyDecoder  # noqa: E402
from qwen_vl_perception.model.generation import hf_decode  # noqa: E402

from decoding import STOPS, assert_same, make_inputs, tiny_model  # noqa: E402
from trained_models import linears_to_nf4  # noqa: E402


@pytest.fixture(scope='module')
def model():
    return tiny_model()


def test_batch_of_one_matches_generate(model):
    inputs = make_inputs([(5, 7, (1, 4, 6))])
    reference = hf_decode(model, inputs, 24, STOPS)
    fast = FastGreedyDecoder()(model, inputs, 24, STOPS)
    assert len(set(reference[0][0])) > 5, 'the tiny model should not repeat one token'
    assert_same(reference, fast)


def test_left_padded_batch_with_a_stop_mid_way_matches_generate(model):
    inputs = make_inputs([(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8)), (9, 1, (1, 4, 4))])
    assert inputs['attention_mask'].sum(1).unique().numel() == 3  # three prompt lengths
    free = hf_decode(model, inputs, 14, [])
    # A stop token that row 0 first produces mid-way and that row 1 never produces.
    row, other = free[0][0], free[0][1]
    first = next(index for index in range(3, 12)
                 if row[index] not in row[:index] and row[index] not in other)
    stop = row[first]
    reference = hf_decode(model, inputs, 14, [stop])
    fast = FastGreedyDecoder()(model, inputs, 14, [stop])
    assert_same(reference, fast)
    assert fast[0][0] == row[:first + 1]  # stopped, the stop token kept
    assert len(fast[0][1]) == 14  # the other row ran on


def test_all_rows_stopping_ends_the_loop(model):
    inputs = make_inputs([(4, 4, (1, 4, 4))])
    free = hf_decode(model, inputs, 12, [])
    stop = free[0][0][3]
    decoder = FastGreedyDecoder()
    ids, probs = decoder(model, inputs, 50, [stop])
    first = free[0][0].index(stop)
    assert ids[0] == free[0][0][:first + 1]
    assert decoder.last_timing.decode_steps == first  # no step after every row stopped


def test_text_only_prompt_matches_generate(model):
    inputs = make_inputs([(11, 0, None), (6, 0, None)])
    assert_same(hf_decode(model, inputs, 16, STOPS), FastGreedyDecoder()(model, inputs, 16, STOPS))


def test_one_session_serves_every_frame_of_a_shape(model):
    decoder = FastGreedyDecoder(cache_bucket=64)
    first = make_inputs([(5, 7, (1, 4, 6))], seed=3)
    second = make_inputs([(6, 6, (1, 4, 6))], seed=4)  # same length, other tokens and pixels
    results = [decoder(model, inputs, 10, STOPS) for inputs in (first, second, first)]
    assert decoder.session_count == 1
    assert results[0] == results[2]
    assert results[0][0] != results[1][0]
    assert_same(hf_decode(model, second, 10, STOPS), results[1])


def test_what_the_last_call_ran_is_public_and_eager_steps_change_no_later_call(model):
    decoder = FastGreedyDecoder()
    assert not decoder.last_session_fused and decoder.last_session_nf4_layers == 0
    with pytest.raises(ValueError, match='no decode session'):
        decoder.step_eagerly()
    inputs = make_inputs([(5, 7, (1, 4, 6))], seed=5)
    first = decoder(model, inputs, 6, STOPS)
    assert not decoder.last_session_fused  # the CPU: no graph, nothing compiled
    assert decoder.last_session_nf4_layers == 0  # no NF4 layers in this model
    decoder.step_eagerly(3)
    assert decoder(model, inputs, 6, STOPS) == first


def test_nf4_model_matches_generate():
    bnb = pytest.importorskip('bitsandbytes')
    model = tiny_model(seed=2)
    language_model = model.model.language_model
    assert linears_to_nf4(model) > 0
    assert isinstance(language_model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    inputs = make_inputs([(5, 7, (1, 4, 6)), (3, 2, (1, 4, 4))])
    assert_same(hf_decode(model, inputs, 8, STOPS),
                FastGreedyDecoder()(model, inputs, 8, STOPS), prob_tolerance=1e-4)


def test_each_decode_step_dispatches_fewer_tensor_ops_than_generate(model):
    """The work per token, counted, not timed (CPU time of a model this small is mostly
    Python and moves with the machine's load): every tensor op that reaches the dispatcher.
    The decoder's static cache and plain argmax leave out generate's per-step cache growth,
    mask rebuild and logits processing. Times are the benchmark's (``--device cpu --tiny
    --cpu-time``, results/benchmark/README.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCount(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    inputs = make_inputs([(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8))])
    decoder = FastGreedyDecoder()
    decoder(model, inputs, 4, [])  # its session made once, as for every later frame

    def ops_per_step(function):
        counts = []
        for new_tokens in (4, 16):
            with OpCount() as count:
                function(model, inputs, new_tokens, [])
            counts.append(count.ops)
        return (counts[1] - counts[0]) / 12

    ours, generate = ops_per_step(decoder), ops_per_step(hf_decode)
    assert 0 < ours < generate, (ours, generate)


def test_rejects_bad_arguments(model):
    inputs = make_inputs([(3, 3, (1, 4, 4))])
    with pytest.raises(ValueError):
        FastGreedyDecoder()(model, inputs, 0, STOPS)
    with pytest.raises(ValueError):
        FastGreedyDecoder()(model, inputs, 4, list(range(9)))
    with pytest.raises(ValueError):
        FastGreedyDecoder(use_cuda_graphs=True)(model, inputs, 4, STOPS)


def test_engine_with_fast_decoder_gives_generate_answers(tmp_path):
    """End to end on a real tiny checkpoint: real tokenizer, image processor, chat template."""
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    from qwen_vl_perception.pipeline.tiny import make_tiny_checkpoint
    from qwen_vl_perception.prompt import PromptBuilder

    checkpoint = make_tiny_checkpoint(tmp_path / 'tiny', seed=5)
    engine = VisionLanguageEngine(checkpoint, device='cpu', quantization='none')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    instruction = PromptBuilder(['cup', 'table'], describe=True).instruction
    reference = engine.generate(images, instruction, max_new_tokens=12)
    engine.decoder = FastGreedyDecoder()
    fast = engine.generate(images, instruction, max_new_tokens=12)
    assert [g.token_ids for g in fast] == [g.token_ids for g in reference]
    assert [g.text for g in fast] == [g.text for g in reference]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
@pytest.mark.parametrize('fuse', [False, True])
def test_cuda_graphs_match_generate_in_float32(fuse):
    model = tiny_model(device='cuda')
    inputs = {k: v.cuda() for k, v in make_inputs(
        [(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8))]).items()}
    reference = hf_decode(model, inputs, 24, STOPS)
    decoder = FastGreedyDecoder(fuse_elementwise=fuse)
    fast = decoder(model, inputs, 24, STOPS)
    assert decoder.last_timing.graph_captured
    assert_same(reference, fast, prob_tolerance=1e-3)
    again = decoder(model, inputs, 24, STOPS)  # replayed graph, no new capture
    assert not decoder.last_timing.graph_captured
    assert again[0] == fast[0]
    free, _ = hf_decode(model, inputs, 16, [])
    assert decoder.choices_given(model, inputs, free) == free


def test_teacher_forced_choices_reproduce_generate(model):
    inputs = make_inputs([(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8))])
    reference, _ = hf_decode(model, inputs, 8, [])
    decoder = FastGreedyDecoder()
    assert decoder.choices_given(model, inputs, reference) == reference
    # A forced token that differs changes the choices after it, not before.
    forced = [list(row) for row in reference]
    forced[0][4] = (forced[0][4] + 1) % 1000
    choices = decoder.choices_given(model, inputs, forced)
    assert choices[0][:5] == reference[0][:5]
    assert choices[1] == reference[1]
    with pytest.raises(ValueError):
        decoder.choices_given(model, inputs, [[1, 2], [3]])


def test_engine_picks_its_decoder_by_name(tiny_checkpoint):
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    from qwen_vl_perception.model.fast_decode import FastGreedyDecoder
    from qwen_vl_perception.model.generation import hf_decode

    # 'auto' is the fast decoder on the CPU too (eager there; same tokens in float32).
    assert isinstance(VisionLanguageEngine(tiny_checkpoint, device='cpu').decoder,
                      FastGreedyDecoder)
    assert VisionLanguageEngine(tiny_checkpoint, device='cpu', decoder='hf').decoder is hf_decode
    fast = VisionLanguageEngine(tiny_checkpoint, device='cpu', decoder='fast')
    assert isinstance(fast.decoder, FastGreedyDecoder)
    with pytest.raises(ValueError, match='decoder must be'):
        VisionLanguageEngine(tiny_checkpoint, device='cpu', decoder='turbo')


@pytest.mark.parametrize('decoder', ['hf', 'fast'])
def test_on_step_reports_every_token_and_stops_between_two(model, decoder):
    """Both decoders tell the hook about each token (counts 1, 2, ...; the tokens so far on
    request) and stop right after the token the hook said False to."""
    decode = hf_decode if decoder == 'hf' else FastGreedyDecoder()
    inputs = make_inputs([(5, 7, (1, 4, 6)), (9, 3, (1, 4, 4))])
    full_ids, full_probs = decode(model, inputs, 16, [])  # no stop token: 16 each
    seen = []

    def hook(step):
        seen.append((step.count, step.token_ids()))
        return step.count < 5

    ids, probs = decode(model, inputs, 16, [], on_step=hook)
    assert [count for count, _ in seen] == [1, 2, 3, 4, 5]
    assert ids == [row[:5] for row in full_ids]
    assert [len(row) for row in probs] == [5, 5]
    for count, so_far in seen:
        assert so_far == [row[:count] for row in full_ids]
    never_stop = decode(model, inputs, 16, [], on_step=lambda step: True)
    assert_same((full_ids, full_probs), never_stop)


@pytest.mark.parametrize('vocab', [151936, 1000, 7])
def test_two_stage_greedy_pick_is_argmax_and_its_softmax_probability(vocab):
    from qwen_vl_perception.model.decode_session import greedy
    torch.manual_seed(0)
    logits = torch.randn(4, vocab, dtype=torch.bfloat16)
    top = logits.max() + 1
    logits[0, [vocab - 1, vocab // 2, 3]] = top  # ties in different parts: the first wins
    logits[1, [5, 4]] = top  # a tie inside one part
    logits[3] = 0.0  # all equal
    best, prob = greedy(torch, logits)
    assert best.tolist() == torch.argmax(logits.float(), dim=-1).tolist()
    assert best[0] == 3 and best[1] == 4 and best[3] == 0
    expected = torch.softmax(logits.float(), dim=-1).gather(1, best[:, None])[:, 0]
    assert torch.allclose(prob, expected, rtol=1e-5, atol=0)


def test_fused_step_pieces_may_compile_more_often_than_torchs_default_limit():
    """Every decoder and every session shape compiles the step's pieces again, all against
    one dynamo limit per function: the fused kernels raise it (torch's 8 would fail the
    ninth capture of a long-running node)."""
    from qwen_vl_perception.model.decode_session import RECOMPILE_LIMIT, StepKernels
    StepKernels(torch, False)
    StepKernels(torch, True)
    config = torch._dynamo.config
    limit = getattr(config, 'recompile_limit', None) or config.cache_size_limit
    assert limit >= RECOMPILE_LIMIT > 8


@cuda
def test_act_mul_compiles_for_more_shapes_and_decoders_than_torchs_default_limit():
    from qwen_vl_perception.model.decode_session import StepKernels
    mlp = torch.nn.Module()
    mlp.act_fn = torch.nn.functional.silu
    for rows in range(1, 11):  # a new StepKernels (a decoder's) and a new shape each time
        gate, up = (torch.randn(rows, 1, 64, device='cuda') for _ in range(2))
        got = StepKernels(torch, True).act_mul(mlp, gate, up)
        assert torch.allclose(got, torch.nn.functional.silu(gate) * up, atol=1e-6)


@pytest.mark.parametrize('fold_act_out', [None, False])
def test_the_decoders_fold_act_out_choice_reaches_its_sessions(model, fold_act_out):
    """Each session gets the decoder's ``fold_act_out`` (on by default); on the CPU nothing
    folds, so neither does SiLU(gate) * up, and the tokens are generate's."""
    inputs = make_inputs([(5, 7, (1, 4, 6))])
    decoder = FastGreedyDecoder(fold_act_out=fold_act_out)
    assert_same(hf_decode(model, inputs, 6, STOPS), decoder(model, inputs, 6, STOPS))
    assert decoder._last_session().fold_act_out == (fold_act_out is None)
    assert not decoder.last_session_folds and not decoder.last_session_folds_act_out


def test_a_session_dropping_silu_times_up_keeps_its_fold_and_dropping_the_fold_drops_both(model):
    """``DecodeSession.without_act_out`` (capture's first fallback of a folded step) turns off
    SiLU(gate) * up in gate+up alone; ``without_folds`` turns off both."""
    from qwen_vl_perception.model.decode_session import DecodeSession, StepKernels
    from qwen_vl_perception.model.qwen3_vl_prefill import text_model_parts
    parts = text_model_parts(model)
    weight = parts.embed_tokens.weight
    session = DecodeSession(torch, model, parts, 1, 32, weight.dtype, weight.device,
                            StepKernels(torch, False), fold_elementwise=True)
    assert session.fold_act_out  # on unless told otherwise, as the decoder's default
    session._folds, session.act_out_folded = ['a layer'], True  # as a folding GPU step has it
    session.without_act_out()
    assert session.folds and not session.act_out_folded and not session.fold_act_out
    session.act_out_folded = True
    session.without_folds()
    assert not session.folds and not session.act_out_folded
