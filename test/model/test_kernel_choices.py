"""KernelChoices' NF4 launch groups: each layer's (q, k, v) and (gate, up) projections, where
the kernel can take them together and all of them have a replacement.

A unit test of that selection on the CPU: the real kernel takes CUDA layers only, so a small
kernel stands in for its ``group_linear_for`` answer; the real grouped launches are tested on
the GPU (test_nf4_matmul.py, test_fast_decode.py)."""
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

import warnings  # noqa: E402

from qwen_vl_perception.model.kernel_choices import KernelChoices  # noqa: E402
from qwen_vl_perception.model.loading import load_model  # noqa: E402
from qwen_vl_perception.model.qwen3_vl_prefill import text_model_parts  # noqa: E402


class GroupingKernel:
    """What nf4_groups asks of the NF4 kernel: a launch for modules sharing an input, or None
    (here: None for groups whose first module is in ``refused``)."""

    def __init__(self, refused=()):
        self.refused = set(refused)

    def group_linear_for(self, modules):
        return None if modules[0] in self.refused else ('group', modules)


def test_groups_are_each_layers_qkv_and_gate_up_where_the_kernel_takes_them(tiny_checkpoint):
    parts = text_model_parts(load_model(tiny_checkpoint, device='cpu', quantization='none'))
    linears = {}
    for layer in parts.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj):
            linears[module] = module
    expected = []
    for layer in parts.layers:
        expected += [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                     (layer.mlp.gate_proj, layer.mlp.up_proj)]
    groups = KernelChoices.nf4_groups(parts, GroupingKernel(), linears)
    assert list(groups) == expected
    assert all(groups[modules] == ('group', modules) for modules in expected)
    first = parts.layers[0]
    refused = KernelChoices.nf4_groups(parts, GroupingKernel([first.mlp.gate_proj]), linears)
    assert list(refused) == [modules for modules in expected
                             if modules[0] is not first.mlp.gate_proj]
    del linears[first.self_attn.k_proj]  # one member without a replacement: no group
    assert expected[0] not in KernelChoices.nf4_groups(parts, GroupingKernel(), linears)
    assert KernelChoices.nf4_groups(parts, None, linears) == {}  # no kernel: no groups


class CapturingSession:
    """What KernelChoices.capture asks of a decode session; its capture fails while ``failing``
    says so, with an error raised where ``fail`` raises it."""

    def __init__(self, fail):
        self.attention, self.nf4_matmul = 'attention kernel', 'nf4 kernel'
        self.kernels = type('Kernels', (), {'fused': True})()
        self.fail, self.captures = fail, 0
        self.folding, self.act_out_folded = True, False

    def without_folds(self):
        self.folding = self.act_out_folded = False

    def without_act_out(self):
        self.act_out_folded = False

    def capture(self, stream):
        self.captures += 1
        self.fail(self)

    def without_decode_attention(self):
        self.attention = None

    def without_nf4(self):
        self.nf4_matmul = None


def test_a_failing_decode_attention_is_dropped_alone():
    pytest.importorskip('triton')
    from qwen_vl_perception.model import decode_attention

    def fail(session):
        if session.attention is not None:  # a kernel launch on CPU tensors raises inside it
            decode_attention.launch(*[torch.zeros(1, 1, 1, 16)] * 3, torch.ones(1, 1).bool(),
                                    torch.zeros(1), torch.zeros(1, 1, 1, 16), torch.zeros(1),
                                    torch.zeros(1, dtype=torch.int32), 1.0)
    choices, session = KernelChoices(), CapturingSession(fail)
    with pytest.warns(RuntimeWarning, match='decode attention kernel failed'):
        choices.capture(session, None, lambda: None)
    assert session.attention is None and choices.attention_failed
    assert session.nf4_matmul == 'nf4 kernel' and not choices.nf4_failed
    assert session.kernels.fused and not choices.fusion_failed and session.captures == 2


def test_other_capture_failures_drop_the_nf4_kernel_then_fusion_and_keep_the_attention():
    def fail(session):
        if session.kernels.fused:
            raise RuntimeError('a fused kernel does not compile')
    choices, session = KernelChoices(), CapturingSession(fail)
    unfused = type('Kernels', (), {'fused': False})()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        choices.capture(session, None, lambda: unfused)
    assert [str(w.message).split(' (')[0] for w in caught] == [
        'capturing the decode step failed', 'fused decode kernels failed to compile or capture']
    assert session.nf4_matmul is None and choices.nf4_failed and choices.fusion_failed
    assert session.attention == 'attention kernel' and not choices.attention_failed
    assert session.kernels is unfused and session.captures == 3


def test_a_failing_folded_step_is_given_up_alone():
    from qwen_vl_perception.model.decode_session import FoldFailed

    def fail(session):
        if session.folding:
            raise FoldFailed('a folded NF4 launch failed (RuntimeError: no kernel image)')
    choices, session = KernelChoices(), CapturingSession(fail)
    with pytest.warns(RuntimeWarning, match='launching the elementwise work apart'):
        choices.capture(session, None, lambda: None)
    assert not session.folding and choices.fold_failed and session.captures == 2
    assert session.nf4_matmul == 'nf4 kernel' and not choices.nf4_failed
    assert session.attention == 'attention kernel' and session.kernels.fused
    assert not choices.folds_for('cpu')
    asked = KernelChoices(fold_elementwise=True)
    assert asked.folds_for('cpu')  # asked for: the session still checks the layers
    asked.fold_failed = True  # as capture sets it: never again, asked for or not
    assert not asked.folds_for('cpu')


@pytest.mark.parametrize('failing', ['act_out', 'any fold'])
def test_a_failing_folded_step_writing_silu_times_up_gives_that_up_first(failing):
    """A folded step whose gate+up writes SiLU(gate) * up: the first failure drops that alone
    (for later sessions too), a failure of the step folded without it drops the fold."""
    from qwen_vl_perception.model.decode_session import FoldFailed

    def fail(session):
        if session.act_out_folded or (failing == 'any fold' and session.folding):
            raise FoldFailed('a folded NF4 launch failed (RuntimeError: no kernel image)')
    choices, session = KernelChoices(), CapturingSession(fail)
    session.act_out_folded = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        choices.capture(session, None, lambda: None)
    messages = [str(w.message).split('; ')[-1] for w in caught]
    assert not session.act_out_folded and not choices.fold_act_out
    if failing == 'act_out':
        assert messages == ['SiLU(gate) * up by a kernel of its own, the rest still folded']
        assert session.folding and not choices.fold_failed and session.captures == 2
    else:
        assert messages == ['SiLU(gate) * up by a kernel of its own, the rest still folded',
                            'launching the elementwise work apart']
        assert not session.folding and choices.fold_failed and session.captures == 3
    assert session.nf4_matmul == 'nf4 kernel' and session.kernels.fused


def test_a_fused_piece_past_the_recompile_limit_drops_fusion_alone():
    """torch.compile's recompile limit reached in a capture is fusion's failure: the NF4 and
    attention kernels stay (blaming the NF4 kernel would move every later prefill and session
    to bitsandbytes' path)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def fail(session):
        if session.kernels.fused:
            try:
                raise FailOnRecompileLimitHit('recompile_limit reached with fullgraph=True')
            except FailOnRecompileLimitHit as error:
                raise RuntimeError('capture failed') from error
    choices, session = KernelChoices(), CapturingSession(fail)
    unfused = type('Kernels', (), {'fused': False})()
    with pytest.warns(RuntimeWarning, match='recompile limit'):
        choices.capture(session, None, lambda: unfused)
    assert session.kernels is unfused and choices.fusion_failed and session.captures == 2
    assert session.nf4_matmul == 'nf4 kernel' and not choices.nf4_failed
    assert session.attention == 'attention kernel' and not choices.attention_failed


@pytest.fixture
def launches_overlap(monkeypatch):
    """Where the GPU could overlap launches (both kernels' checks say yes), on any machine:
    ``folds_for('cuda')`` asks only them (no GPU is touched)."""
    pytest.importorskip('triton')
    from qwen_vl_perception.model import decode_attention, nvrtc
    answers = {'attention': True, 'nvrtc': True}
    monkeypatch.setattr(decode_attention, 'overlap_supported', lambda device: answers['attention'])
    monkeypatch.setattr(nvrtc, 'programmatic_launch_supported', lambda device: answers['nvrtc'])
    return answers


def test_folding_is_on_by_default_only_with_graphs_where_both_kernels_overlap(launches_overlap):
    """``fold_elementwise=None`` folds only in graphed sessions where the NF4 and attention
    kernels both launch overlapped, and never with ``overlap_launches=False`` or on the CPU;
    True and False are taken as said."""
    assert KernelChoices().overlap_launches and KernelChoices().fold_elementwise is None
    assert KernelChoices().folds_for('cuda')
    assert not KernelChoices().folds_for('cuda', graphs=False)  # eager: a failure would raise
    assert not KernelChoices().folds_for('cpu')
    assert not KernelChoices(overlap_launches=False).folds_for('cuda')
    assert not KernelChoices(overlap_launches=0).overlap_launches
    assert not KernelChoices(fold_elementwise=False).folds_for('cuda')
    assert not KernelChoices(fold_elementwise=0).folds_for('cuda')  # falsy is False, not None
    assert KernelChoices(fold_elementwise=True).folds_for('cuda', graphs=False)
    launches_overlap['attention'] = False  # e.g. a Triton without programmatic launch
    assert not KernelChoices().folds_for('cuda')
    launches_overlap.update(attention=True, nvrtc=False)  # e.g. a driver before CUDA 12.3
    assert not KernelChoices().folds_for('cuda')


def test_a_folded_step_writes_silu_times_up_from_gate_up_unless_told_not_to():
    """``fold_act_out=None`` (the default) is on; False and falsy values are off."""
    assert KernelChoices().fold_act_out and KernelChoices(fold_act_out=True).fold_act_out
    assert not KernelChoices(fold_act_out=False).fold_act_out
    assert not KernelChoices(fold_act_out=0).fold_act_out


def test_the_prefill_runs_through_the_step_kernels_by_default_until_that_fails():
    """``fuse_prefill=None`` is on (timed on the H200, issue #16); False and falsy are off; a
    failure turns it off with one warning."""
    class Session:
        kernels = object()
    choices = KernelChoices()
    assert choices.fuse_prefill and choices.prefill_kernels(Session) is Session.kernels
    assert KernelChoices(fuse_prefill=False).prefill_kernels(Session) is None
    assert KernelChoices(fuse_prefill=0).prefill_kernels(Session) is None
    with pytest.warns(RuntimeWarning, match='through the step kernels failed'):
        choices.give_up_prefill_fusion(RuntimeError('compile error'))
    assert choices.prefill_fusion_failed and choices.prefill_kernels(Session) is None
