"""Whole-model checks: token agreement with model.generate, step profile, instruction prefill."""
import numpy as np

from qwen_vl_perception.model.generation import common_prefix


def agreement(model, decoders, tensors, new_tokens, label):
    """Our tokens against ``model.generate`` greedy (``hf_decode``), forced to ``new_tokens``.

    ``sequences_identical`` and ``tokens_before_first_difference`` compare free-running
    outputs (one near-tie changes everything after it); ``per_token`` is teacher forced: our
    choice at each position given generate's tokens before it.
    """
    from qwen_vl_perception.model.generation import hf_decode
    reference, _ = hf_decode(model, tensors, new_tokens, [])
    entry = {'label': label, 'new_tokens': new_tokens, 'rows': len(reference)}
    for name, decoder in decoders.items():
        ours, _ = decoder(model, tensors, new_tokens, [])
        common = [common_prefix(ref_row, row) for ref_row, row in zip(reference, ours)]
        choices = decoder.choices_given(model, tensors, reference)
        same = sum(a == b for ref_row, row in zip(reference, choices)
                   for a, b in zip(ref_row, row))
        entry[name] = {
            'sequences_identical': sum(a == b for a, b in zip(reference, ours)) / len(ours),
            'tokens_before_first_difference': sum(common) / (new_tokens * len(ours)),
            'common_prefix_per_row': common,
            'per_token': same / (new_tokens * len(reference))}
        decoder.clear()
    return entry


def agreement_text(entry, name) -> str:
    """One decoder's line of an agreement entry."""
    figures = entry[name]
    return (f"agreement {entry['label']} ({name}): per token (teacher forced) "
            f"{figures['per_token']:.1%}, sequences identical "
            f"{figures['sequences_identical']:.0%}, tokens before first "
            f"difference {figures['tokens_before_first_difference']:.0%}")


def profile_step(torch, decoder, model, tensors, path, steps=3):
    """Kernel times of eager decode steps (no graph): where a step's GPU time goes."""
    decoder(model, tensors, 8, [])
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.step_eagerly(steps)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel rows only: operator rows repeat their kernels' time.
    from torch.autograd import DeviceType
    device_us = sum(event.self_device_time_total for event in events
                    if getattr(event, 'device_type', None) == DeviceType.CUDA) / steps
    text = events.table(sort_by='self_cuda_time_total', row_limit=30)
    path.write_text(f'GPU kernel time per step: {device_us / 1000:.3f} ms\n{text}\n')
    decoder.clear()
    return device_us / 1000


def instruction_prefill(timer, model, tensors, repeats):
    """The language model's prefill of the text before the image alone (batch 1), run eagerly
    through the model's forward: what reusing the instruction's KV cache could save per frame
    on that path. The fast decoder's graphed static prefill is much faster (issue #16:
    ~1.5 ms of a 22 ms prefill at batch 1, results/benchmark/README.md), so the figure says
    which path it timed."""
    from qwen_vl_perception.model.configs import VISION_START_TOKEN_ID
    from qwen_vl_perception.model.fast_decode import text_model_parts
    ids = tensors['input_ids'][:1]
    start = int((ids[0] == VISION_START_TOKEN_ID).nonzero()[0])
    prefix = ids[:, :start]
    language_model = model.model.language_model
    text_model_parts(model)  # a Qwen3-VL, as the rest of the tool assumes
    language_model(input_ids=prefix, use_cache=True)
    seconds = [timer.seconds(lambda: language_model(input_ids=prefix, use_cache=True))[0]
               for _ in range(repeats)]
    return {'tokens': start, 'ms': 1000 * float(np.median(seconds)),
            'path': "eager (the model's forward, not the decoder's graphed prefill)"}
