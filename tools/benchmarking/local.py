"""The local benchmark: one model quantized phase by phase, each timing and check recorded."""
import tempfile
import time
from pathlib import Path

from qwen_vl_perception.model.fast_decode import FastGreedyDecoder
from qwen_vl_perception.model.torch_support import require, require_torch

from .arguments import TRISTATE, parse_pair
from .checks import agreement, agreement_text, instruction_prefill, profile_step
from .inputs import article_instruction, make_input_builder, test_image
from .layer_checks import attention_check, linear_step, lm_head_check
from .memory import memory_processes
from .models import (SIZE_KEYS, SKIPPED, build_model, dtype_name, quantize_linears,
                     set_compute_dtype)
from .report import new_results, row_text, table, write_json
from .timing import Timer, time_generate, time_ours

STEPS = ((False, False, None, ', launches apart, not overlapped'),
         (False, True, None, ', launches overlapped'),
         (True, False, None, ', elementwise work folded'),
         (True, True, None, ', folded, launches overlapped'),
         (True, True, False, ', folded, launches overlapped, SiLU x up apart'))
"""``--step-check``'s decode steps: (folded, overlapped, gate+up writes SiLU(gate) * up
(None: as ``--fold-act-out`` says), label suffix of their runs)."""


def local_benchmark(args, script: Path):
    """The local benchmark of ``args``; ``script`` runs the fresh memory processes."""
    torch = require_torch()
    transformers = require('transformers', 'to build Qwen3-VL')
    device = pick_device(torch, args)
    bench = Benchmark(args, torch, device, new_results(args, torch, device))
    if args.memory_processes and bench.on_cuda:  # first, while this process holds no GPU memory
        bench.memory_processes(script)
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        bench.build_inputs(Path(workdir))
        bench.build_model(transformers)
        if args.linears_only:
            bench.run_linears_only()
        else:
            bench.run_variants()
    bench.save()
    print()
    print(table(bench.results))
    return bench.results


def pick_device(torch, args):
    """The device to run on; with ``--cpu-time``, one torch thread (CPU only)."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.cpu_time:
        if device.type == 'cuda':
            raise SystemExit('--cpu-time is for --device cpu')
        torch.set_num_threads(1)
    return device


class Benchmark:
    """One process's benchmark: the inputs, the model (quantized in place phase by phase), one
    decoder, and the ``results`` written to ``--out`` after every step (partial results count).
    Each check records an error and goes on rather than losing the runs before it."""

    def __init__(self, args, torch, device, results):
        self.args, self.torch, self.device, self.results = args, torch, device, results
        self.on_cuda = device.type == 'cuda'
        self.dtype = torch.bfloat16 if self.on_cuda else torch.float32
        self.dtype_name = dtype_name(self.dtype)
        self.fuse = TRISTATE[args.fuse]
        self.nf4_kernel = TRISTATE[args.nf4_kernel]
        self.overlap, self.fold = TRISTATE[args.overlap], TRISTATE[args.fold]
        self.fold_act_out = TRISTATE[args.fold_act_out]
        self.fuse_prefill = TRISTATE[args.fuse_prefill]
        self.width, self.height = parse_pair(args.image)
        self.timer = Timer(torch, device, cpu_time=args.cpu_time)
        self.builder = self.instruction = self.model = self.decoder = None
        self.batches, self.mixed = {}, None
        self.steps = None  # --step-check's decoders, once made
        self.other_prefill = None  # --prefill-check's decoder, once made

    # -- bookkeeping ---------------------------------------------------------------------

    def save(self):
        write_json(self.args.out, self.results)

    def error(self, what, error):
        self.results['errors'].append(f'{what}: {type(error).__name__}: {error}')
        print(self.results['errors'][-1], flush=True)

    def add_run(self, run, save=True):
        self.results['runs'].append(run)
        print(row_text(run), flush=True)
        if save:
            self.save()

    def new_decoder(self, fuse=None, nf4_kernel=None, overlap_launches=None,
                    fold_elementwise=None, fold_act_out=None, fuse_prefill=None):
        """A decoder with the command line's choices, unless told otherwise."""
        def given(value, default):
            return default if value is None else value
        return FastGreedyDecoder(fuse_elementwise=given(fuse, self.fuse),
                                 nf4_kernel=given(nf4_kernel, self.nf4_kernel),
                                 overlap_launches=given(overlap_launches, self.overlap),
                                 fold_elementwise=given(fold_elementwise, self.fold),
                                 fold_act_out=given(fold_act_out, self.fold_act_out),
                                 fuse_prefill=given(fuse_prefill, self.fuse_prefill))

    def step_decoders(self) -> dict:
        """``--step-check``: a decoder per decode step of :data:`STEPS` (each says in its runs
        whether it folded), by the label suffix of its runs; with ``--fold-act-out off`` the
        last is the fourth's step and left out."""
        if not (self.args.step_check and self.on_cuda):
            return {}
        if self.steps is None:  # made once: tuned and captured once for agreement and runs
            self.steps = {suffix: self.new_decoder(overlap_launches=overlapped,
                                                   fold_elementwise=folded,
                                                   fold_act_out=act_out)
                          for folded, overlapped, act_out, suffix in STEPS
                          if not (act_out is False and self.fold_act_out is False)}
        return self.steps

    def prefill_decoder(self):
        """``--prefill-check``'s decoder (the other ``fuse_prefill`` choice than the default
        decoder's), made once; None without it or off CUDA."""
        if not (self.args.prefill_check and self.on_cuda):
            return None
        if self.other_prefill is None:
            fused = self.decoder.kernel_choices.fuse_prefill
            self.other_prefill = self.new_decoder(fuse_prefill=not fused)
        return self.other_prefill

    def prefill_suffix(self) -> str:
        """The label suffix of ``--prefill-check``'s runs and agreement."""
        fused = self.prefill_decoder().kernel_choices.fuse_prefill
        return ', prefill fused' if fused else ', prefill unfused'

    def time_ours(self, decoder, batch, new_tokens, label, repeats=None):
        """``decoder`` on ``batch`` test images, ``new_tokens`` forced (a run's figures)."""
        return time_ours(self.timer, decoder, self.model, self.batch_inputs(batch), batch,
                         new_tokens, self.args.repeats if repeats is None else repeats, label)

    # -- setting up ----------------------------------------------------------------------

    def memory_processes(self, script: Path):
        variants = [variant for variant in ('nf4', 'nf4-all') if variant in self.args.variants]
        self.results['memory_processes'] = memory_processes(self.args, variants, script)
        self.save()

    def build_inputs(self, workdir: Path):
        """The node's prompt on test images: batch 1 (timed), every ``--batch-sizes`` batch
        and the mixed-size batch of the agreement check, on the device."""
        self.builder = make_input_builder(self.args, workdir)
        self.instruction = article_instruction()
        started = time.perf_counter()
        one = self.builder.build([test_image(self.width, self.height, 0)], self.instruction)
        self.results['input_build_ms_batch1'] = 1000 * (time.perf_counter() - started)
        self.results['prompt_tokens'] = one.prompt_length
        self.results['visual_tokens'] = int(
            (one.tensors['input_ids'] == self.builder.image_token_id).sum())
        self.results['instruction'] = self.instruction
        for size in sorted(set(self.args.batch_sizes) | {1}):
            self.batch_inputs(size)
        small = (max(32, self.width * 3 // 4 // 32 * 32),
                 max(32, self.height * 3 // 4 // 32 * 32))
        images = [test_image(self.width, self.height, 10), test_image(*small, 11),
                  test_image(self.width, self.height, 12)]
        self.mixed = self.builder.build(images, self.instruction).to(self.device).tensors

    def batch_inputs(self, batch):
        """The device tensors of ``batch`` test images (seeds 0 to batch - 1), built once."""
        if batch not in self.batches:
            images = [test_image(self.width, self.height, seed) for seed in range(batch)]
            self.batches[batch] = self.builder.build(images, self.instruction).to(
                self.device).tensors
        return self.batches[batch]

    def build_model(self, transformers):
        self.results['clock'] = 'process CPU time, 1 thread' if self.args.cpu_time else 'wall'
        self.timer.reset_peak()
        self.model = build_model(self.torch, transformers, self.args, self.device, self.dtype)
        self.results['parameters'] = sum(p.numel() for p in self.model.parameters())
        self.results['model_gb'] = {self.dtype_name: self.timer.allocated_gb()}
        self.decoder = self.new_decoder()

    # -- the checks, each recorded in results ---------------------------------------------

    def our_runs(self, label):
        """Our engine at every ``--batch-sizes`` x ``--new-tokens``."""
        for batch in self.args.batch_sizes:
            for new_tokens in self.args.new_tokens:
                try:
                    run = self.time_ours(self.decoder, batch, new_tokens, label)
                except Exception as error:  # record and go on: partial results count
                    self.error(f'ours {label} b{batch} n{new_tokens}', error)
                    continue
                self.add_run(run)
            self.decoder.clear()  # peak memory per batch size, not all sizes' caches at once

    def check_agreement(self, label, steps=False):
        """Our tokens against ``model.generate``'s: the default decoder, on CUDA unfused too,
        and with ``steps`` every ``--step-check`` decoder."""
        if self.args.agreement_tokens <= 0:
            return
        decoders = {'default': self.decoder}
        if self.on_cuda and self.fuse is not False:
            decoders['unfused'] = self.new_decoder(fuse=False)
        if steps:
            decoders.update((suffix.lstrip(', '), decoder)
                            for suffix, decoder in self.step_decoders().items())
            if self.prefill_decoder() is not None:
                decoders[self.prefill_suffix().lstrip(', ')] = self.prefill_decoder()
        try:
            entry = agreement(self.model, decoders, self.mixed, self.args.agreement_tokens,
                              label)
        except Exception as error:
            self.error(f'agreement {label}', error)
            return
        self.results['agreement'].append(entry)
        for name in decoders:
            print(agreement_text(entry, name), flush=True)
        self.save()

    def profile(self, label):
        if not (self.args.profile and self.on_cuda):
            return
        name = 'profile_' + ''.join(c if c.isalnum() else '_' for c in label)[:40] + '.txt'
        path = (self.args.out.parent if self.args.out else Path('.')) / name
        try:
            self.results['profile_ms_per_step'][label] = profile_step(
                self.torch, self.decoder, self.model, self.batches[1], path)
        except Exception as error:
            self.results['errors'].append(f'profile {label}: {type(error).__name__}: {error}')
        print(f"profile {label}: {self.results['profile_ms_per_step'].get(label)} ms of "
              'kernels per step', flush=True)

    def memory_check(self, where):
        """What stays allocated once the decoder has dropped its sessions."""
        self.decoder.clear()
        self.timer.reset_peak()
        self.results['allocated_gb'][where] = self.timer.allocated_gb()

    def unfused_check(self, label):
        if not self.args.unfused_check:
            return
        plain = self.new_decoder(fuse=False)
        self.add_run(self.time_ours(plain, 1, self.args.new_tokens[0], label + ' unfused'),
                     save=False)
        plain.clear()
        self.save()

    def step_check(self, label):
        """Our engine with each decode step of :meth:`step_decoders`, beside the default
        runs."""
        for suffix, decoder in self.step_decoders().items():
            for batch in self.args.batch_sizes:
                try:
                    run = self.time_ours(decoder, batch, self.args.new_tokens[0], label + suffix)
                except Exception as error:
                    self.error(f'ours {label} b{batch}{suffix}', error)
                    continue
                decoder.clear()
                self.add_run(run)

    def prefill_check(self, label):
        """Our engine with the other ``fuse_prefill`` choice, beside the default runs."""
        decoder = self.prefill_decoder()
        if decoder is None:
            return
        suffix = self.prefill_suffix()
        for batch in self.args.batch_sizes:
            try:
                run = self.time_ours(decoder, batch, self.args.new_tokens[0], label + suffix)
            except Exception as error:
                self.error(f'ours {label} b{batch}{suffix}', error)
                continue
            finally:
                decoder.clear()  # peak memory per batch, as the other checks keep it
            self.add_run(run)

    def bnb_check(self, label):
        if not self.args.bnb_check:
            return
        plain = self.new_decoder(nf4_kernel=False)
        for spec in self.args.bnb_check:
            batch, new_tokens = parse_pair(spec)
            run = self.time_ours(plain, batch, new_tokens, label + ', bitsandbytes decode linears')
            plain.clear()
            self.add_run(run)

    def linear_check(self):
        if not (self.args.linear_rows and self.on_cuda):
            return
        try:
            self.results['decode_linears'] = linear_step(self.torch, self.model,
                                                         self.args.linear_rows, self.dtype)
        except Exception as error:
            self.error('linears', error)
        self.save()

    def attention_check(self):
        """``--attention-splits``: one step's attention, kernel per split against SDPA, at the
        cache the decoder makes for the first ``--new-tokens``, half-way through the answer."""
        if not (self.args.attention_splits and self.on_cuda):
            return
        prompt, new_tokens = self.results['prompt_tokens'], self.args.new_tokens[0]
        bucket = self.decoder.cache_bucket
        cache_len = -(-(prompt + new_tokens) // bucket) * bucket
        try:
            self.results['decode_attention'] = attention_check(
                self.torch, self.model, self.args.batch_sizes, cache_len,
                prompt + new_tokens // 2, self.args.attention_splits, self.dtype)
        except Exception as error:
            self.error('attention', error)
        self.save()

    def lm_head_check(self):
        if not (self.args.lm_head_check and self.on_cuda):
            return
        try:
            self.results['lm_head'] = lm_head_check(self.torch, self.model, self.mixed,
                                                    self.args.linear_rows or [1, 8])
        except Exception as error:
            self.error('lm_head', error)
        self.save()

    def prefix_check(self):
        self.results['instruction_prefill'] = instruction_prefill(
            self.timer, self.model, self.batches[1], self.args.repeats)
        print(f"instruction prefix alone: {self.results['instruction_prefill']}", flush=True)
        self.save()

    def article_runs(self, label):
        """Our engine, then ``model.generate``, at every ``--article-runs`` configuration."""
        for spec in self.args.article_runs:
            batch, new_tokens = parse_pair(spec)
            self.add_run(self.time_ours(self.decoder, batch, new_tokens, label), save=False)
            self.decoder.clear()
            self.add_run(time_generate(self.timer, self.model, self.batch_inputs(batch), batch,
                                       new_tokens, self.args.article_repeats, label))

    # -- the phases: one model, quantized further in each -----------------------------------

    def quantize(self, variant):
        """Quantize the model's remaining linears as ``variant`` does (in place); record the
        model's size."""
        count = quantize_linears(self.torch, self.model, self.dtype, skip=SKIPPED[variant])
        self.timer.reset_peak()
        self.results['model_gb'][SIZE_KEYS[variant]] = self.timer.allocated_gb()
        self.results['nf4_layers'] = self.results.get('nf4_layers', 0) + count

    def run_unquantized(self):
        label = self.dtype_name
        self.check_agreement(label)
        self.our_runs(label)
        self.unfused_check(label)
        self.profile(label)
        self.memory_check(f'after {label} runs')

    def run_nf4(self):
        """The language model NF4, vision tower unquantized (the node's on-load quantization)."""
        label = f'nf4, {self.dtype_name} compute, vision {self.dtype_name}'
        self.check_agreement(label, steps=True)
        self.our_runs(label)
        self.unfused_check(label)
        self.step_check(label)
        self.prefill_check(label)
        self.bnb_check(label)
        self.linear_check()
        self.lm_head_check()
        self.attention_check()
        self.prefix_check()
        self.profile(label)
        self.memory_check(f'after {label} runs')

    def run_nf4_all(self):
        self.our_runs(f'nf4 all, {self.dtype_name} compute')

    def run_article(self):
        """nf4-all with the article's float16 compute (float32 on the CPU)."""
        compute = self.torch.float16 if self.on_cuda else self.torch.float32
        set_compute_dtype(self.model, compute)
        label = f'article model (nf4 all, {dtype_name(compute)} compute)'
        self.check_agreement(label)
        self.article_runs(label)

    def run_variants(self):
        variants = set(self.args.variants)
        if 'bf16' in variants:
            self.run_unquantized()
        if variants & {'nf4', 'nf4-all', 'article'}:
            self.quantize('nf4')
            if 'nf4' in variants:
                self.run_nf4()
        if variants & {'nf4-all', 'article'}:
            self.decoder.clear()
            self.quantize('nf4-all')
            if 'nf4-all' in variants:
                self.run_nf4_all()
            if 'article' in variants:
                self.run_article()

    def run_linears_only(self):
        """``--linears-only``: quantize as the nf4 variant, then only the layer checks."""
        self.quantize('nf4')
        self.linear_check()
        self.lm_head_check()
        self.attention_check()
