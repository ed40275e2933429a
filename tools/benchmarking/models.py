"""The model under test: built (random weights or a checkpoint) and quantized to NF4 in place."""
from qwen_vl_perception.model.configs import qwen3_vl_4b_config, tiny_config
from qwen_vl_perception.model.torch_support import require

SKIPPED = {'nf4': ('lm_head', 'visual'), 'nf4-all': ('lm_head',)}
"""The module names a variant leaves unquantized: nf4 the vision tower and lm_head (the node's
on-load quantization), nf4-all only lm_head (the article's model)."""
SIZE_KEYS = {'nf4': 'nf4 (vision unquantized)', 'nf4-all': 'nf4 (all but lm_head)'}
"""Each quantized variant's key in the results' ``model_gb``."""


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'``."""
    return str(dtype).replace('torch.', '')


def build_model(torch, transformers, args, device, dtype):
    """``--model`` (unquantized) or the ``--tiny`` or 4B architecture with random weights made
    directly on ``device``; in eval mode."""
    if args.model is not None:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            str(args.model), dtype=dtype, device_map={'': str(device)})
        if getattr(model.config, 'quantization_config', None) is not None:
            raise SystemExit('--model must be an unquantized checkpoint (it is quantized here)')
        return model.eval()
    config = transformers.Qwen3VLConfig(**(tiny_config() if args.tiny else qwen3_vl_4b_config()))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def quantize_linears(torch, model, compute_dtype, skip, double_quant=True) -> int:
    """Replace ``nn.Linear`` layers (not under a name in ``skip``) by bitsandbytes NF4 ones,
    as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))``
    does on load. Returns how many were replaced."""
    bnb = require('bitsandbytes', 'to quantize to NF4')
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f'{parent_name}.{name}' if parent_name else name
            if type(child) is not torch.nn.Linear or any(
                    part in skip for part in full_name.split('.')):
                continue
            setattr(parent, name, nf4_linear(bnb, child, compute_dtype, double_quant))
            count += 1
    return count


def nf4_linear(bnb, linear, compute_dtype, double_quant):
    """A bitsandbytes NF4 copy of ``linear`` on its device."""
    quantized = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type='nf4',
        device='meta')
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=double_quant,
        quant_type='nf4', module=quantized).to(linear.weight.device)
    if linear.bias is not None:
        quantized.bias = linear.bias
    return quantized


def set_compute_dtype(model, dtype) -> None:
    """Every NF4 layer of ``model`` computes in ``dtype`` from now on."""
    for module in model.modules():
        if hasattr(module, 'compute_dtype') and hasattr(module.weight, 'quant_state'):
            module.compute_dtype = dtype
