"""KernelChoices' NF4 launch groups: each layer's (q, k, v) and (gate, up) projections, where
the kernel can take them together and all of them have a replacement.

A unit test of that selection on the CPU: the real kernel takes CUDA layers only, so a small
kernel stands in for its ``group_linear_for`` answer; the real grouped launches are tested on
the GPU (test_nf4_matmul.py, test_fast_decode.py)."""
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

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
