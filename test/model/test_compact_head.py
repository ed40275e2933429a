"""The compact output head picks exactly what the full head picks, and the fast decoder uses it
for a model whose vocabulary rows are mostly zero (as the default model's are)."""
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from decoding import STOPS, assert_same, make_inputs, tiny_model  # noqa: E402

from qwen_vl_perception.model.compact_head import CompactHead  # noqa: E402
from qwen_vl_perception.model.fast_decode import FastGreedyDecoder  # noqa: E402
from qwen_vl_perception.model.generation import hf_decode  # noqa: E402


def _head(vocab=1000, hidden=16, used=(3, 17, 250, 999), seed=0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[list(used)] = torch.randn(len(used), hidden, generator=generator)
    return head


def _full_pick(head, hidden):
    logits = head(hidden).float()
    return torch.argmax(logits, -1), torch.softmax(logits, -1).amax(-1)


def test_picks_and_probabilities_equal_the_full_heads():
    head = _head()
    compact = CompactHead.for_head(torch, head)
    assert compact is not None and compact.first_zero_id == 0
    hidden = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 3
    best, prob = compact.best(hidden)
    full_best, full_prob = _full_pick(head, hidden)
    assert torch.equal(best, full_best)
    torch.testing.assert_close(prob, full_prob, rtol=1e-5, atol=1e-7)
    assert (best == 0).any() and (best != 0).any()  # both cases happened: zero rows won some


def test_ties_at_zero_go_to_the_first_index_as_argmax_does():
    head = _head(used=(0, 5, 9))  # row 0 is used: the first zero row is 1
    with torch.no_grad():
        head.weight[0] = 0.0
        head.weight[0, 0] = 1.0  # logit of token 0 = hidden[0]
        head.weight[5] = 0.0
        head.weight[5, 1] = 1.0
        head.weight[9] = 0.0
        head.weight[9, 2] = -1.0
    compact = CompactHead.for_head(torch, head)
    hidden = torch.zeros(4, 16)
    hidden[:, :3] = torch.tensor([
        [0.0, 0.0, 0.5],    # token 0 ties at 0 with the zero rows and comes first: 0
        [-1.0, 0.0, 0.0],   # token 5 ties at 0, after zero row 1: 1
        [-1.0, -2.0, 3.0],  # every used logit below 0: the first zero row, 1
        [0.0, 2.0, 0.0]])   # a used logit above 0 wins: 5
    best, prob = compact.best(hidden)
    full_best, full_prob = _full_pick(head, hidden)
    assert best.tolist() == full_best.tolist() == [0, 1, 1, 5]
    torch.testing.assert_close(prob, full_prob, rtol=1e-5, atol=1e-7)


def test_only_heads_of_mostly_zero_rows_get_one():
    dense = torch.nn.Linear(16, 100, bias=False)
    assert CompactHead.for_head(torch, dense) is None
    biased = _head()
    biased.bias = torch.nn.Parameter(torch.zeros(1000))
    assert CompactHead.for_head(torch, biased) is None


def test_fast_decoder_with_a_mostly_zero_vocabulary_matches_generate():
    model = tiny_model(seed=6)
    embedding = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(2)
    inputs = make_inputs([(5, 7, (1, 4, 6)), (3, 2, None)])
    keep = torch.unique(torch.cat([inputs['input_ids'].flatten(),
                                   torch.tensor(STOPS),
                                   torch.randint(0, embedding.shape[0], (300,),
                                                 generator=generator)]))
    with torch.no_grad():
        kept = embedding[keep].clone()
        embedding.zero_()
        embedding[keep] = kept
    assert model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()  # tied
    decoder = FastGreedyDecoder()
    reference = hf_decode(model, inputs, 12, STOPS)
    assert_same(reference, decoder(model, inputs, 12, STOPS))
    assert decoder.kernel_choices.compact_head(torch, model, model.lm_head) is not None
