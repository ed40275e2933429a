"""Timing the two engines: the clock, our decoder's frames and ``model.generate``'s."""
import gc
import time

import numpy as np

GB = 1e9


def further_token_ms(frame_s: float, prefill_s: float, new_tokens: int) -> float:
    """Decode ms per token after the first, from a frame's and its prefill's seconds. A frame
    no longer than its prefill (a busy machine, too few repeats) has no such figure: an error,
    not a negative or zero one."""
    if frame_s <= prefill_s:
        raise ValueError(f'a {new_tokens}-token frame took {frame_s:.3f} s, no longer than its '
                         f'prefill alone ({prefill_s:.3f} s): no decode figure (the machine is '
                         'too busy for it, or use more repeats)')
    return 1000 * (frame_s - prefill_s) / max(new_tokens - 1, 1)


class Timer:
    """Wall clock (device synchronised), or with ``cpu_time`` the process's CPU time: on a
    CPU shared with other jobs that measures the work done, not the wait for a core."""

    def __init__(self, torch, device, cpu_time=False):
        self.torch, self.device, self.cpu_time = torch, device, cpu_time
        self.clock = time.process_time if cpu_time else time.perf_counter

    def sync(self):
        if self.device.type == 'cuda':
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.device.type == 'cuda':
            self.sync()
            gc.collect()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        if self.device.type != 'cuda':
            return None
        return self.torch.cuda.max_memory_allocated(self.device) / GB

    def allocated_gb(self):
        if self.device.type != 'cuda':
            return None
        return self.torch.cuda.memory_allocated(self.device) / GB

    def seconds(self, function):
        self.sync()
        started = self.clock()
        result = function()
        self.sync()
        return self.clock() - started, result


def time_ours(timer, decoder, model, tensors, batch, new_tokens, repeats, label):
    """Our decoder at one configuration: a first call (tuning, graph capture), then the median
    of ``repeats`` timed frames, with the decoder's own prefill and decode split."""
    timer.reset_peak()
    first_s, _ = timer.seconds(lambda: decoder(model, tensors, new_tokens, []))
    captured = decoder.last_timing.graph_captured
    frames, prefills, decodes, paths = [], [], [], set()
    for _ in range(repeats):
        seconds, (ids, _) = timer.seconds(lambda: decoder(model, tensors, new_tokens, []))
        assert all(len(row) == new_tokens for row in ids), 'forced length not reached'
        frames.append(seconds)
        paths.add(decoder.last_timing.prefill)
        prefills.append(decoder.last_timing.prefill_s)
        decodes.append(decoder.last_timing.decode_ms_per_token)
    frame = float(np.median(frames))
    prefill_s = float(np.median(prefills))
    decode_ms = float(np.median(decodes))
    if timer.cpu_time:  # the decoder's own timings are wall clock: measure as for generate
        prefill_s = float(np.median([
            timer.seconds(lambda: decoder(model, tensors, 1, []))[0] for _ in range(repeats)]))
        decode_ms = further_token_ms(frame, prefill_s, new_tokens)
    return {
        'engine': 'ours', 'label': label, 'batch': batch, 'new_tokens': new_tokens,
        'prefill_ms': 1000 * prefill_s, 'decode_ms_per_token': decode_ms,
        'frame_s': frame, 'frames_per_s': batch / frame, 'frame_s_runs': frames,
        'first_call_s': first_s, 'first_call_captured_graph': captured,
        'prefill_path': '+'.join(sorted(paths)),  # graphed, static or model (a fallback)
        'peak_gb': timer.peak_gb(), 'fused': decoder.last_session_fused,
        'folded': decoder.last_session_folds,
        'folded_act_out': decoder.last_session_folds_act_out,
        'overlap_requested': decoder.kernel_choices.overlap_launches,  # sm_90+ only
        'fuse_prefill': decoder.kernel_choices.fuse_prefill,  # asked; prefill_fused: what ran
        'prefill_fused': decoder.last_prefill_fused,
        'nf4_kernel_layers': decoder.last_session_nf4_layers,
        'nf4_shapes': nf4_shapes(decoder)}


def nf4_shapes(decoder) -> list:
    """The NF4 launch shapes ``decoder``'s tuner picked so far (plain and folded, per layer
    shape and row bucket; each decoder tunes its own, so two runs may differ here), without
    the candidates' timings."""
    nf4 = decoder.kernel_choices.nf4_matmul
    if nf4 is None:
        return []
    return [{key: value for key, value in entry.items() if key != 'timed_ms'}
            for entry in nf4.tuned_shapes()]


def time_generate(timer, model, tensors, batch, new_tokens, repeats, label):
    """``model.generate`` greedy at one configuration, forced to ``new_tokens``: prefill is a
    one-token call, decode the rest of the median frame per further token."""
    def generate(count):
        return model.generate(**tensors, max_new_tokens=count, min_new_tokens=count,
                              do_sample=False, temperature=None, top_k=None, top_p=None)

    timer.reset_peak()
    generate(2)  # warm-up
    prefill_s, _ = timer.seconds(lambda: generate(1))
    frames = []
    for _ in range(repeats):
        seconds, output = timer.seconds(lambda: generate(new_tokens))
        assert output.shape[1] - tensors['input_ids'].shape[1] == new_tokens
        frames.append(seconds)
    frame = float(np.median(frames))
    return {
        'engine': 'generate', 'label': label, 'batch': batch, 'new_tokens': new_tokens,
        'prefill_ms': 1000 * prefill_s,
        'decode_ms_per_token': further_token_ms(frame, prefill_s, new_tokens),
        'frame_s': frame, 'frames_per_s': batch / frame, 'frame_s_runs': frames,
        'peak_gb': timer.peak_gb()}
