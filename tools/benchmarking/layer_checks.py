"""Single layers' device time in CUDA graphs: a decode step's NF4 linears; lm_head, bf16 vs fp8;
a decode step's attention."""
from functools import partial

from qwen_vl_perception.model.kernel_choices import SHARED_INPUT_LINEARS

from .timing import GB

DECODE_LINEARS = (('self_attn', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
                  ('mlp', ('gate_proj', 'up_proj', 'down_proj')))
DECODE_GROUPS = (SHARED_INPUT_LINEARS[0], ('self_attn', ('o_proj',)),
                 SHARED_INPUT_LINEARS[1], ('mlp', ('down_proj',)))
"""A decode step's launches when the layers sharing an input go together (FastGreedyDecoder)."""
SINGLE_TIMINGS = (('self_attn', 'q_proj'), ('self_attn', 'k_proj'), ('mlp', 'gate_proj'))
"""Grouped layers also timed one per launch, for comparison."""


def graph_ms(torch, calls, replays):
    """Device milliseconds of one replay of a CUDA graph of ``calls`` (after a warm-up run,
    which also tunes the NF4 kernel's launch shapes), and the calls' outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [call() for call in calls]
    graph.replay()
    torch.cuda.synchronize()
    # Copies: the graph's outputs live in its memory pool, which the next graph reuses.
    outputs = [[part.clone() for part in out] if isinstance(out, (list, tuple)) else out.clone()
               for out in outputs]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    milliseconds = start.elapsed_time(end) / replays
    graph.reset()
    return milliseconds, outputs


def nf4_bytes(modules):
    """Bytes a product reads of these NF4 layers: packed codes and first-level absmax."""
    return sum(module.weight.data.numel() * module.weight.data.element_size()
               + module.weight.quant_state.absmax.numel()
               * module.weight.quant_state.absmax.element_size() for module in modules)


# -- one decode step's NF4 linears ---------------------------------------------------------

def linear_step(torch, model, rows_list, dtype, replays=20):
    """Device time of one decode step's NF4 linears (every layer's seven, one CUDA graph):
    bitsandbytes' ``Linear4bit.forward``, the NF4 kernel one layer per launch, and the kernel
    with each layer's (q, k, v) and (gate, up) in one launch as the decoder runs them; then
    each launch shape alone (a graph of its launches over all layers: the weights stream
    from memory as in a step). Per row count."""
    from qwen_vl_perception.model.fast_decode import text_model_parts
    from qwen_vl_perception.model.nf4_matmul import NF4Matmul
    layers = text_model_parts(model).layers
    modules = [getattr(getattr(layer, owner), name) for layer in layers
               for owner, names in DECODE_LINEARS for name in names]
    matmul = NF4Matmul()
    fused = [matmul.linear_for(module) for module in modules]
    if any(function is None for function in fused):
        raise ValueError('not every decode linear is NF4 on CUDA')
    groups = decode_launches(layers, matmul)
    weight_bytes = nf4_bytes(modules)
    rows_results = []
    for rows in rows_list:
        inputs = step_inputs(torch, rows, groups, dtype)
        entry = {'rows': rows, 'layers': len(modules), 'launches_grouped': len(groups),
                 'weights_gb': weight_bytes / GB}
        entry.update(whole_step(torch, modules, fused, groups, inputs, weight_bytes, replays))
        entry.update(with_overlap(torch, matmul, groups, inputs, weight_bytes, replays,
                                  outputs=entry.pop('_grouped_outputs')))
        entry['per_shape'] = per_shape(torch, layers, matmul, groups, inputs, replays)
        rows_results.append(entry)
        print(step_text(entry), flush=True)
    return {'rows': rows_results, 'launch_shapes': matmul.tuned_shapes()}


def decode_launches(layers, matmul):
    """``(name, modules, function returning a list of outputs)`` per launch of a decode step,
    layer by layer, as the decoder groups them."""
    groups = []
    for layer in layers:
        for owner, names in DECODE_GROUPS:
            members = [getattr(getattr(layer, owner), name) for name in names]
            if len(members) > 1:
                function = matmul.group_linear_for(members)
                if function is None:
                    raise ValueError(f'{names} cannot share a launch')
            else:
                function = as_list(matmul.linear_for(members[0]))
            groups.append(('+'.join(names), members, function))
    return groups


def as_list(linear):
    """``linear`` returning its output in a list, as a group's function does."""
    return lambda x: [linear(x)]


def step_inputs(torch, rows, groups, dtype):
    """A random input per module; the layers of a group get one input, as in a decode step."""
    inputs = {}
    for _, members, _ in groups:
        x = torch.randn(rows, 1, members[0].in_features, device='cuda', dtype=dtype)
        inputs.update((member, x) for member in members)
    return inputs


def whole_step(torch, modules, fused, groups, inputs, weight_bytes, replays):
    """The step's linears in one graph each way: milliseconds, bytes per second, and the fused
    outputs' largest difference from bitsandbytes' relative to its largest value."""
    figures, outputs = {}, {}
    for name, calls in (
            ('bitsandbytes', [partial(module, inputs[module]) for module in modules]),
            ('fused', [partial(function, inputs[module])
                       for function, module in zip(fused, modules)]),
            ('fused_grouped', [partial(function, inputs[members[0]])
                               for _, members, function in groups])):
        milliseconds, outputs[name] = graph_ms(torch, calls, replays)
        figures[f'{name}_ms'] = milliseconds
        figures[f'{name}_tb_per_s'] = weight_bytes / milliseconds / 1e9
    grouped_flat = [out for outs in outputs['fused_grouped'] for out in outs]
    figures['max_relative_difference'] = max(
        float((a.float() - b.float()).abs().max() / b.float().abs().max())
        for a, b in zip(outputs['fused'] + grouped_flat,
                        outputs['bitsandbytes'] + outputs['bitsandbytes']))
    figures['_grouped_outputs'] = grouped_flat
    return figures


def with_overlap(torch, matmul, groups, inputs, weight_bytes, replays, outputs):
    """The grouped launches again with programmatic dependent launch (each kernel may start
    before the one before has ended; sm_90+), and whether their outputs equal the plain ones
    (the same kernels on the same inputs: a determinism check, each launch has its own
    input)."""
    matmul.overlap_launches = True
    try:
        milliseconds, overlapped = graph_ms(torch, [partial(function, inputs[members[0]])
                                                    for _, members, function in groups], replays)
    finally:
        matmul.overlap_launches = False
    overlapped = [out for outs in overlapped for out in outs]
    if not outputs or len(outputs) != len(overlapped):
        raise ValueError(f'{len(overlapped)} overlapped outputs against {len(outputs)} plain')
    return {'grouped_overlapped_ms': milliseconds,
            'grouped_overlapped_tb_per_s': weight_bytes / milliseconds / 1e9,
            'overlap_outputs_identical': all(bool(torch.equal(a, b))
                                             for a, b in zip(outputs, overlapped))}


def per_shape(torch, layers, matmul, groups, inputs, replays):
    """Each launch shape alone over all layers (in the order the decoder launches them), then
    the grouped layers one per launch."""
    shapes = []
    for name in dict.fromkeys(name for name, _, _ in groups):
        chosen = [(members, function) for group, members, function in groups if group == name]
        shapes.append(shape_timing(torch, name, [members for members, _ in chosen], [
            partial(function, inputs[members[0]]) for members, function in chosen], replays))
    for owner, name in SINGLE_TIMINGS:
        chosen = [getattr(getattr(layer, owner), name) for layer in layers]
        shapes.append(shape_timing(torch, name, [[module] for module in chosen], [
            partial(matmul.linear_for(module), inputs[module]) for module in chosen], replays))
    return shapes


def shape_timing(torch, name, member_lists, calls, replays):
    """One launch shape over all layers (a CUDA graph of ``calls``): microseconds per launch
    and the NF4 bytes read per second."""
    milliseconds, _ = graph_ms(torch, calls, replays)
    members = member_lists[0]
    return {'layers': name, 'out_features': [module.out_features for module in members],
            'in_features': members[0].in_features, 'launches': len(calls),
            'us_per_launch': 1000 * milliseconds / len(calls),
            'tb_per_s': nf4_bytes([m for ms in member_lists for m in ms]) / milliseconds / 1e9}


def step_text(entry) -> str:
    """What ``linear_step`` prints for one row count."""
    lines = [f"linears of one decode step, {entry['rows']} rows: bitsandbytes "
             f"{entry['bitsandbytes_ms']:.3f} ms ({entry['bitsandbytes_tb_per_s']:.2f} TB/s), "
             f"fused {entry['fused_ms']:.3f} ms ({entry['fused_tb_per_s']:.2f} TB/s), "
             f"grouped {entry['fused_grouped_ms']:.3f} ms "
             f"({entry['fused_grouped_tb_per_s']:.2f} TB/s; with overlapped launches "
             f"{entry['grouped_overlapped_ms']:.3f} ms, outputs identical: "
             f"{entry['overlap_outputs_identical']}), max relative difference "
             f"{entry['max_relative_difference']:.2e}"]
    for shape in entry['per_shape']:
        lines.append(f"  {shape['layers']:28} {str(shape['out_features']):20} x "
                     f"{shape['in_features']:5}: {shape['us_per_launch']:7.2f} us per launch, "
                     f"{shape['tb_per_s']:.2f} TB/s")
    return '\n'.join(lines)


# -- lm_head ----------------------------------------------------------------------------------

def lm_head_check(torch, model, tensors, rows_list, replays=20):
    """lm_head's decode-step time in bf16 against an 8-bit copy (fp8 e4m3 weights with
    per-row scales, the input row-scaled to fp8 too: cuBLASLt's ``_scaled_mm``), and how often
    their greedy choice agrees, each against float32 logits, over every position of
    ``tensors``' prompts (the model's final hidden states)."""
    head = model.get_output_embeddings().weight
    head8, fp8_bytes = fp8_head(torch, head)
    result = {'vocab': head.shape[0], 'hidden': head.shape[1],
              'bf16_gb': head.numel() * head.element_size() / GB,
              'fp8_gb': fp8_bytes / GB, 'rows': []}
    for rows in rows_list:
        x = torch.randn(rows, head.shape[1], device=head.device, dtype=head.dtype)
        bf16_ms, _ = graph_ms(torch, [lambda: torch.nn.functional.linear(x, head)], replays)
        fp8_ms, _ = graph_ms(torch, [lambda: head8(x)], replays)
        result['rows'].append({'rows': rows, 'bf16_ms': bf16_ms, 'fp8_ms': fp8_ms,
                               'bf16_tb_per_s': result['bf16_gb'] / bf16_ms,
                               'fp8_tb_per_s': result['fp8_gb'] / fp8_ms})
    result.update(head_agreement(torch, model, tensors, head, head8))
    print(f'lm_head: {result}', flush=True)
    return result


def fp8_head(torch, head):
    """An fp8 (e4m3, per-row scales) copy of the ``head`` weight as a function of bf16 rows,
    and the copy's bytes."""
    fp8 = torch.float8_e4m3fn
    limit = torch.finfo(fp8).max
    weight_scale = head.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / limit
    weight8 = (head.float() / weight_scale).to(fp8)

    def head8(x):
        rows = x.shape[0]
        padded = torch.zeros(-(-rows // 16) * 16, x.shape[1], dtype=x.dtype, device=x.device)
        padded[:rows] = x
        x_scale = padded.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / limit
        x8 = (padded.float() / x_scale).to(fp8)
        out = torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                               out_dtype=torch.bfloat16)
        return out[:rows]

    return head8, weight8.numel() + weight_scale.numel() * 4


def head_agreement(torch, model, tensors, head, head8):
    """How often bf16, fp8 and float32 logits pick the same token at every prompt position of
    ``tensors`` (the model's final hidden states)."""
    output = model.model(**{name: value for name, value in tensors.items()
                            if name in ('input_ids', 'attention_mask', 'pixel_values',
                                        'image_grid_thw', 'mm_token_type_ids')})
    hidden = output.last_hidden_state[tensors['attention_mask'].bool()]  # (positions, hidden)
    exact = (hidden.float() @ head.float().T).argmax(-1)
    bf16 = torch.nn.functional.linear(hidden, head).float().argmax(-1)
    eight = torch.cat([head8(chunk) for chunk in hidden.split(256)]).float().argmax(-1)
    return {'positions': int(hidden.shape[0]),
            'bf16_vs_fp32': float((bf16 == exact).float().mean()),
            'fp8_vs_fp32': float((eight == exact).float().mean()),
            'fp8_vs_bf16': float((eight == bf16).float().mean())}


# -- one decode step's attention -----------------------------------------------------------

def attention_check(torch, model, batch_sizes, cache_len, position, splits, dtype, replays=50):
    """Device time of one decode step's attention, every layer (one CUDA graph, each layer its
    own cache, so the keys stream from memory as in a step), per batch size: the decode
    attention kernel at each of ``splits`` keys per part (it also norms, rotates and writes
    the step's key and value, as the decoder runs it) against ``scaled_dot_product_attention``
    over the whole static cache with the step's mask (what the unfused step runs, without
    the norm, rotation and cache write), at ``position``. The kernel's correctness is the
    tests' (test_decode_attention.py)."""
    from qwen_vl_perception.model.decode_attention import split_for
    from qwen_vl_perception.model.decode_session import decode_attention_step
    from qwen_vl_perception.model.fast_decode import text_model_parts
    parts = text_model_parts(model)
    layers, heads, groups = len(parts.layers), parts.num_kv_heads, \
        parts.num_heads // parts.num_kv_heads
    head_dim = parts.head_dim
    device = parts.embed_tokens.weight.device
    results = {'layers': layers, 'cache_len': cache_len, 'position': position, 'runs': []}
    for batch in batch_sizes:
        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=dtype)
        keys = [randn(batch, heads, cache_len, head_dim) for _ in range(layers)]
        values = [randn(batch, heads, cache_len, head_dim) for _ in range(layers)]
        q = randn(batch, heads, groups, head_dim)
        new_keys, new_values = randn(batch, heads, head_dim), randn(batch, heads, head_dim)
        valid = torch.ones(batch, cache_len, dtype=torch.bool, device=device)
        where = torch.tensor([position], device=device)
        angles = torch.rand(batch, head_dim // 2, device=device).repeat(1, 2)
        ones = torch.ones(head_dim, device=device, dtype=dtype)
        norm_rope = (ones, ones, 1e-6, angles.cos().to(dtype), angles.sin().to(dtype))
        scale = head_dim ** -0.5
        multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
        entry = {'batch': batch,
                 'split_chosen': split_for(batch, heads, cache_len, multiprocessors)}
        # as the unfused step calls it: a key head's query heads as its query positions,
        # the additive mask of the dtype's lowest value
        allowed = valid & (torch.arange(cache_len, device=device) <= position)
        mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]

        def sdpa(layer):
            return torch.nn.functional.scaled_dot_product_attention(
                q, keys[layer], values[layer], attn_mask=mask, scale=scale)
        ms, _ = graph_ms(torch, [partial(sdpa, layer) for layer in range(layers)], replays)
        entry['sdpa_us_per_layer'] = 1000 * ms / layers
        for split in splits:
            step = decode_attention_step(torch, batch, parts, cache_len, device, split=split)

            def kernel(layer, step=step):
                return step(q, keys[layer], values[layer], valid, where, scale, new_keys,
                            new_values, norm_rope)
            try:
                ms, _ = graph_ms(torch, [partial(kernel, layer) for layer in range(layers)],
                                 replays)
            except Exception as error:  # a split the kernel cannot take: said, not fatal
                entry[f'split_{split}_error'] = f'{type(error).__name__}: {error}'
                continue
            entry[f'split_{split}_us_per_layer'] = 1000 * ms / layers
        results['runs'].append(entry)
        print(f'decode attention, batch {batch}, cache {cache_len}, position {position}: '
              + ', '.join(f'{key[:-len("_us_per_layer")]} {value:.1f} us'
                          for key, value in entry.items() if key.endswith('_us_per_layer'))
              + f" per layer (the decoder's split: {entry['split_chosen']})", flush=True)
    return results
