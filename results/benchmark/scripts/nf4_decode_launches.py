"""The 4B model's decode NF4 launch shapes at one row (bf16, random weights), tuned by
``NF4Matmul`` (session 11, #16). Run from the repository root on a CUDA machine with
bitsandbytes:

- ``profile``: tune, then one launch of each shape with the CUDA profiler on, for Nsight
  Compute (``gpu_ncu_nf4_cuda.txt``): ``ncu --profile-from-start off -k nf4_mma ... python3
  results/benchmark/scripts/nf4_decode_launches.py profile``;
- ``tune-repeat``: tune three times in a row in this fresh process and print each tuner's
  picks and best timings (``gpu_tuner_repeat.txt``);
- ``sweep``: every CUDA launch shape (warps, row tiles, blocks in flight, split, decode table
  copies) of each launch at 1 and 8 rows, timed as a decode step meets it: a CUDA graph of
  the launch over enough copies of the layer (distinct weights) that they stream from memory,
  us per launch (``--out``: ``gpu_table_sweep.json``; with ``--tables 0 --layouts stored
  tiled``: ``gpu_tiled_sweep.json``; with ``--tables 0 --x-ahead 0 1``:
  ``gpu_x_ahead_sweep.json``; with ``--tables 0 --clusters 0 1 [--overlap]``: split
  reductions through a thread-block cluster's shared memory beside the workspace's,
  ``gpu_cluster_sweep*.json``);
- ``folds``: each decode launch with the elementwise work folded in (RMSNorm into q+k+v and
  gate+up, the residual add into o and down, SiLU x up into down) against the plain launch of
  the same tuned shape, and the step's elementwise kernels that folding removes, each streamed
  as in ``sweep`` (``--out``: ``gpu_fold_launches.json``);
- ``pdl``: a decode step's 144 NF4 launches as a chain (36 layers of distinct weights, each
  launch reading the one before's output, nothing between them: the step once every
  elementwise kernel is folded away), graphed, with each launch plain or with programmatic
  dependent launch in kernel variants: ``x`` through L2 (``ld.global.cg``, before session 14)
  or by plain loads (since), the next launch let in after the loop (before) or right after the
  wait (since); the chain's outputs must be bit-identical across variants (``--out``:
  ``gpu_pdl_chain.json``);
- ``folds-v2``: each decode launch as the folded step (v2, session 14) runs it: q+k+v and
  gate+up with the norm's 1 / rms (``scale``), o and down adding to the residual stream and
  writing the next norm's x (``norm_out``), against the plain launch of the same tuned shape,
  streamed as in ``sweep``; with ``--baseline FILE`` (an older ``nf4_cuda.py``) its kernel's
  folded launches too, and their largest difference from this one's (``--out``:
  ``gpu_fold_v2_launches.json``); gate+up also writing SiLU(gate) * up itself
  (``act_out``, session 16: ``folded_act_out_us`` against ``folded_this_us`` plus
  ``act_mul_us``).
"""
import argparse
import dataclasses
import itertools
import json
import ast
import math
import subprocess
import sys
import time

import bitsandbytes as bnb
import torch

sys.path.insert(0, '.')
from qwen_vl_perception.model import nf4_cuda  # noqa: E402
from qwen_vl_perception.model.nf4_matmul import LaunchShape, NF4Matmul, nf4_weight  # noqa: E402
from tools.benchmarking.models import nf4_linear  # noqa: E402

SHAPES = (('k', [(1024, 2560)]), ('qkv', [(4096, 2560), (1024, 2560), (1024, 2560)]),
          ('o', [(2560, 4096)]), ('gate_up', [(9728, 2560), (9728, 2560)]),
          ('down', [(2560, 9728)]))
"""Launch name, (out, in) features of its layers."""


def layer_sets():
    torch.manual_seed(0)
    sets = []
    for name, shapes in SHAPES:
        layers = [nf4_linear(bnb, torch.nn.Linear(inputs, outputs, bias=False, device='cuda',
                                                  dtype=torch.bfloat16), torch.bfloat16, True)
                  for outputs, inputs in shapes]
        sets.append((name, layers))
    return sets


def tuned_launches(matmul, sets):
    """(name, function, x) per launch, each run (and so tuned) once."""
    launches = []
    for name, layers in sets:
        function = (matmul.group_linear_for(layers) if len(layers) > 1
                    else matmul.linear_for(layers[0]))
        x = torch.randn(1, 1, layers[0].in_features, device='cuda', dtype=torch.bfloat16)
        function(x)
        launches.append((name, function, x))
    torch.cuda.synchronize()
    return launches


def sm_clock():
    return subprocess.run(['nvidia-smi', '--query-gpu=clocks.sm', '--format=csv,noheader'],
                          capture_output=True, text=True).stdout.strip()


def profile(sets):
    matmul = NF4Matmul()
    launches = tuned_launches(matmul, sets)
    for _ in range(2):  # warm, outside the profiled range
        for _, function, x in launches:
            function(x)
    for shape in matmul.tuned_shapes():
        print(shape)
    torch.cuda.cudart().cudaProfilerStart()
    for name, function, x in launches:
        torch.cuda.nvtx.range_push(name)
        function(x)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def tune_repeat(sets, attempts=3):
    for attempt in range(attempts):
        print('attempt', attempt, 'sm clock before', sm_clock(), flush=True)
        matmul = NF4Matmul()
        start = time.perf_counter()
        tuned_launches(matmul, sets)
        print(f'  tuned in {time.perf_counter() - start:.1f} s, sm clock after', sm_clock())
        for shape in matmul.tuned_shapes():
            timed = sorted(shape['timed_ms'], key=lambda pair: pair[0])
            b = shape['shape']
            chosen = f"{b['kernel'][0]}{b['block_n']}/{b['splits']}/{b['num_warps']}/" \
                     f"{b['num_stages']}"
            print('  ', shape['widths'], shape['in_features'], 'chosen', chosen, 'best us',
                  [round(ms * 1000, 1) for ms, _ in timed[:4]], 'worst',
                  round(timed[-1][0] * 1000, 1))


def streamed_us(launch, copies, repeats=10):
    """us per launch of ``launch(i)`` for i over ``copies`` layer copies, in one graph."""
    for i in range(copies):  # compile and make the buffers outside the capture
        launch(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            launch(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    graph.reset()
    return start.elapsed_time(end) * 1000 / repeats / copies


def streamed_copies(shapes, streamed_bytes):
    """(bytes of one copy, copies of a launch's NF4 weights): enough distinct copies (at least
    4) that a graph over them reads ``streamed_bytes`` from memory, as a decode step does."""
    weight_bytes = sum(outputs * inputs // 2 for outputs, inputs in shapes)
    copies = max(4, math.ceil(streamed_bytes / weight_bytes))
    return weight_bytes, [[nf4_weight(nf4_linear(bnb, torch.nn.Linear(
        inputs, outputs, bias=False, device='cuda', dtype=torch.bfloat16), torch.bfloat16,
        True)) for outputs, inputs in shapes] for _ in range(copies)]


def finish(results, out_path):
    """The clock after a run, and the results to ``out_path`` as JSON (if given)."""
    results['sm_clock_after'] = sm_clock()
    if out_path:
        with open(out_path, 'w') as handle:
            json.dump(results, handle, indent=1)


def tiled_copy(weight):
    """``weight`` with its packed bytes and absmax in the kernel's tiled layout."""
    packed, absmax = nf4_cuda.tiled(weight.packed, weight.absmax, weight.out_features,
                                    weight.in_features)
    return dataclasses.replace(weight, packed=packed, absmax=absmax, tiled=True)


def sweep(out_path, tables, layouts, row_counts, x_aheads=(False,), clusters=(False,),
          overlap=False, streamed_bytes=240e6):
    torch.manual_seed(0)
    matmul = NF4Matmul(overlap_launches=overlap)
    results = {'streamed_bytes': streamed_bytes, 'sm_clock_before': sm_clock(),
               'overlapped_launches': overlap, 'runs': []}
    for name, shapes in SHAPES:
        weight_bytes, layer_copies = streamed_copies(shapes, streamed_bytes)
        copies = len(layer_copies)
        if 'tiled' in layouts:
            tiled_copies = [[tiled_copy(weight) for weight in layers] for layers in layer_copies]
        widths = [outputs for outputs, _ in shapes]
        blocks = shapes[0][1] // 64
        for rows in row_counts:
            x = torch.randn(rows, shapes[0][1], device='cuda', dtype=torch.bfloat16)
            timed = []
            for warps, row_tiles, pipe, table, splits, layout, ahead, cluster in \
                    itertools.product((4, 8), (1, 2), (2, 4, 8), tables, (1, 2, 4, 8), layouts,
                                      x_aheads, clusters):
                if not nf4_cuda.fits(nf4_cuda.CudaShape(warps, row_tiles, pipe, table,
                                                        cluster=cluster)):
                    continue
                if blocks // splits < warps or (splits == 8 and not cluster) or (
                        cluster and splits == 1):
                    continue  # clusters: splits 2-8 (8: clusters only); the workspace: 1-4
                shape = LaunchShape(16 * row_tiles, splits, warps, pipe, 'cuda', table, ahead,
                                    cluster)
                weights = tiled_copies if layout == 'tiled' else layer_copies
                if layout == 'tiled' or (cluster and splits <= 4):  # the bits of the stored
                    plain = dataclasses.replace(shape, cluster=False)  # layout, workspace
                    assert all(torch.equal(a, b) for a, b in zip(
                        matmul.grouped(x, weights[0], shape),
                        matmul.grouped(x, layer_copies[0], plain))), (name, shape)
                us = streamed_us(lambda i: matmul.grouped(x, weights[i], shape), copies)
                timed.append((us, f'w{warps}r{row_tiles}p{pipe}t{table}s{splits}'
                                  + ('-tiled' if layout == 'tiled' else '')
                                  + ('-ahead' if ahead else '')
                                  + ('-cluster' if cluster else '')))
            tuner = NF4Matmul(overlap_launches=overlap)  # its own pick, streamed the same way
            tuner.grouped(x, layer_copies[0])
            picked = tuner.tuned_shapes()[0]['shape']
            tuned_us = streamed_us(lambda i: tuner.grouped(x, layer_copies[i]), copies)
            timed.sort()
            best = {}
            for us, key in timed:
                kind = ('table' if 't0s' not in key else 'register') + (
                    ' tiled' if '-tiled' in key else '') + (
                    ' x ahead' if '-ahead' in key else '') + (
                    ' cluster' if '-cluster' in key else '')
                best.setdefault(kind, (us, key))
            run = {'launch': name, 'rows': rows, 'widths': widths, 'in_features': shapes[0][1],
                   'copies': copies, 'weight_mb': weight_bytes / 1e6, 'best': best,
                   'tuner_pick': picked, 'tuner_pick_us': tuned_us,
                   'tb_per_s_best': weight_bytes / (timed[0][0] * 1e-6) / 1e12,
                   'timed_us': timed}
            results['runs'].append(run)
            print(name, rows, {kind: (round(us, 2), key) for kind, (us, key) in best.items()},
                  'tuner', round(tuned_us, 2), picked, 'top5',
                  [(round(us, 2), key) for us, key in timed[:5]], flush=True)
        layer_copies.clear()
        if 'tiled' in layouts:
            tiled_copies.clear()
        torch.cuda.empty_cache()
    finish(results, out_path)


def tuned_plain(layer_copies, rows, inputs):
    """A matmul tuned on the first copy (both kernels, as the engine does), its ``x``, the
    tuned shape, and the plain launch streamed over the copies (us)."""
    matmul = NF4Matmul()
    x = torch.randn(rows, inputs, device='cuda', dtype=torch.bfloat16)
    matmul.grouped(x, layer_copies[0])
    shape = matmul.tuned_shapes()[0]['shape']
    return matmul, x, shape, streamed_us(lambda i: matmul.grouped(x, layer_copies[i]),
                                         len(layer_copies))


def plain_cases(names, row_counts, streamed_bytes):
    """Each launch of ``names`` at each row count, streamed as in ``sweep``: (name, its
    layers' shapes, rows, the layer copies, inputs, total width, then :func:`tuned_plain`'s
    matmul, x, tuned shape and plain us). A launch's copies are freed after its last row
    count."""
    for name, shapes in SHAPES:
        if name not in names:
            continue
        _, layer_copies = streamed_copies(shapes, streamed_bytes)
        inputs, width = shapes[0][1], sum(outputs for outputs, _ in shapes)
        for rows in row_counts:
            yield (name, shapes, rows, layer_copies, inputs, width,
                   *tuned_plain(layer_copies, rows, inputs))
        layer_copies.clear()
        torch.cuda.empty_cache()


def record(results, run, digits):
    """``run`` added to ``results`` and printed (its floats to ``digits`` decimals)."""
    results['runs'].append(run)
    print(run['launch'], run['rows'], {
        key: (round(value, digits) if isinstance(value, float) else value)
        for key, value in run.items() if key not in ('launch', 'rows', 'copies')}, flush=True)


FOLDS = {'qkv': ('norm',), 'o': ('residual',), 'gate_up': ('norm',),
         'down': ('residual', 'act+residual')}
"""What each launch of a folded decode step folds in."""


def folds(out_path, row_counts, streamed_bytes=240e6):
    from qwen_vl_perception.model.decode_session import StepKernels
    torch.manual_seed(0)
    kernels = StepKernels(torch, True)
    results = {'streamed_bytes': streamed_bytes, 'sm_clock_before': sm_clock(), 'runs': []}
    for (name, shapes, rows, layer_copies, inputs, width, matmul, x, shape,
         plain_us) in plain_cases(FOLDS, row_counts, streamed_bytes):
        copies = len(layer_copies)
        run = {'launch': name, 'rows': rows, 'copies': copies, 'tuned_shape': shape,
               'plain_us': plain_us}
        if shape['kernel'] == 'cuda':
            weight = torch.ones(inputs, device='cuda', dtype=torch.bfloat16)
            squares = torch.rand(inputs, device='cuda')
            out_squares = torch.zeros(width, device='cuda')
            hidden = torch.randn(rows, width, device='cuda', dtype=torch.bfloat16)
            gate_up = torch.randn(rows, 2 * inputs, device='cuda', dtype=torch.bfloat16)
            for fold in FOLDS[name]:
                def launch(i, fold=fold):
                    if fold == 'norm':
                        return matmul.folded(x, layer_copies[i], norm=(weight, 1e-6,
                                                                       squares))
                    return matmul.folded(gate_up if fold.startswith('act') else x,
                                         layer_copies[i], act=fold.startswith('act'),
                                         residual=(hidden, out_squares))
                run[f'folded_{fold}_us'] = streamed_us(launch, copies)
        # the elementwise kernels folding removes, alone (graphed, 100 in a row)
        h3 = torch.randn(rows, 1, inputs, device='cuda', dtype=torch.bfloat16)
        w = torch.ones(inputs, device='cuda', dtype=torch.bfloat16)
        run['rms_norm_us'] = streamed_us(lambda i: kernels.rms_norm(h3, w, 1e-6), 100)
        run['add_rms_norm_us'] = streamed_us(lambda i: kernels.add_rms_norm(h3, h3, w, 1e-6),
                                             100)
        if name == 'down':
            act = torch.nn.SiLU()
            mlp = type('MLP', (), {'act_fn': act})()
            g = torch.randn(rows, 1, inputs, device='cuda', dtype=torch.bfloat16)
            run['act_mul_us'] = streamed_us(lambda i: kernels.act_mul(mlp, g, g), 100)
        record(results, run, 2)
    finish(results, out_path)


FOLDS_V2 = {'qkv': 'scale', 'o': 'residual', 'gate_up': 'scale', 'down': 'residual'}
"""What each launch of the folded step (v2) folds in."""


def folds_v2(out_path, row_counts, baseline=None, streamed_bytes=240e6):
    from qwen_vl_perception.model.decode_session import StepKernels
    torch.manual_seed(0)
    kernels = StepKernels(torch, True)
    sources = {'this': SHIPPED_SOURCE}
    if baseline:
        with open(baseline) as handle:  # its SOURCE string, without importing the module
            sources['baseline'] = next(
                node.value.value for node in ast.parse(handle.read()).body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == 'SOURCE')
    results = {'streamed_bytes': streamed_bytes, 'sm_clock_before': sm_clock(),
               'sources': list(sources), 'runs': []}
    hidden_size = SHAPES[1][1][0][1]
    for (name, shapes, rows, layer_copies, inputs, width, matmul, x, shape,
         plain_us) in plain_cases(FOLDS_V2, row_counts, streamed_bytes):
        copies = len(layer_copies)
        run = {'launch': name, 'fold': FOLDS_V2[name], 'rows': rows, 'copies': copies,
               'tuned_shape': shape, 'plain_us': plain_us}
        if shape['kernel'] == 'cuda':
            squares = torch.rand(inputs, device='cuda')
            weight = torch.ones(width, device='cuda', dtype=torch.bfloat16)
            hidden = torch.randn(rows, width, device='cuda', dtype=torch.bfloat16)
            start_hidden = hidden.clone()
            normed = torch.empty_like(hidden)
            out_squares = torch.zeros(width, device='cuda')
            firsts = {}
            for label, source in sources.items():
                nf4_cuda.SOURCE = source
                nf4_cuda._KERNELS.clear()

                def launch(i):
                    if FOLDS_V2[name] == 'scale':
                        return matmul.folded(x, layer_copies[i], scale=(1e-6, squares))
                    return matmul.folded(x, layer_copies[i], residual=(hidden, out_squares),
                                         norm_out=(weight, normed))
                hidden.copy_(start_hidden)
                outs = launch(0)
                firsts[label] = [out.clone() for out in outs] or [hidden.clone(),
                                                                  normed.clone()]
                run[f'folded_{label}_us'] = streamed_us(launch, copies)
            nf4_cuda.SOURCE = SHIPPED_SOURCE
            nf4_cuda._KERNELS.clear()
            if name == 'gate_up' and matmul.foldable(rows, layer_copies[0], act_out=True):
                # SiLU(gate) * up written by the launch itself (this kernel only)
                run['act_out_shape'] = matmul.tuned_shapes()[0]['act_out_fold_shape']
                run['folded_act_out_us'] = streamed_us(lambda i: matmul.folded(
                    x, layer_copies[i], scale=(1e-6, squares), act_out=True), copies)
            if 'baseline' in firsts:
                run['max_abs_difference'] = max(
                    float((a.float() - b.float()).abs().max())
                    for a, b in zip(firsts['this'], firsts['baseline']))
        # the elementwise kernels folding v2 removes (graphed, 100 in a row), at the width
        # the step runs them: the norms over the hidden size, SiLU x up after gate+up
        h3 = torch.randn(rows, 1, hidden_size, device='cuda', dtype=torch.bfloat16)
        w = torch.ones(hidden_size, device='cuda', dtype=torch.bfloat16)
        if FOLDS_V2[name] == 'residual':
            run['add_rms_norm_us'] = streamed_us(
                lambda i: kernels.add_rms_norm(h3, h3, w, 1e-6), 100)
        if name == 'gate_up':
            mlp = type('MLP', (), {'act_fn': torch.nn.SiLU()})()
            g = torch.randn(rows, 1, shapes[0][0], device='cuda', dtype=torch.bfloat16)
            run['act_mul_us'] = streamed_us(lambda i: kernels.act_mul(mlp, g, g), 100)
        record(results, run, 3)
    finish(results, out_path)


PDL_WAIT = ('    wait_for_previous_kernel(wq[0][0][0].x, K);  // x and the outputs: the '
            "kernels' before us\n")
PDL_TRIGGER = ("    let_next_kernel_launch();  // it waits for this kernel's end before it reads "
               'our output\n')
PDL_LOOP_END = '#undef LOAD_STAGE\n'
PDL_LOAD = '#define X_LOAD " @q ld.global.v4.u32'
PDL_VARIANTS = ('plain', 'pdl-cg-late', 'pdl-ld-late', 'pdl-cg-early', 'pdl-ld-early')
"""The chain's variants: no programmatic launch; with it, ``x`` loaded through L2 (``cg``, as
before session 14) or plainly (``ld``, shipped since), the next launch let in after the loop
(before session 14) or right after the wait (shipped since)."""


def pdl_source(variant):
    """``nf4_cuda.SOURCE`` (``pdl-ld-early``) changed for one of :data:`PDL_VARIANTS`."""
    source = SHIPPED_SOURCE
    for text in (PDL_WAIT + PDL_TRIGGER, PDL_LOOP_END, PDL_LOAD):
        assert source.count(text) == 1, text
    if '-cg' in variant:
        source = source.replace(PDL_LOAD, PDL_LOAD.replace('ld.global', 'ld.global.cg'))
    if variant.endswith('-late'):
        source = source.replace(PDL_WAIT + PDL_TRIGGER, PDL_WAIT).replace(
            PDL_LOOP_END, PDL_LOOP_END + PDL_TRIGGER)
    return source


SHIPPED_SOURCE = nf4_cuda.SOURCE


def chain_layers(layers=36, gain=1.7):
    """``layers`` decode layers of distinct NF4 weights (weights scaled by ``gain`` so the
    chain's values neither vanish nor grow): [q, k, v], [o], [gate, up], [down]."""
    torch.manual_seed(0)
    made = []
    for _ in range(layers):
        launches = []
        for _, shapes in SHAPES[1:]:
            weights = []
            for outputs, inputs in shapes:
                linear = torch.nn.Linear(inputs, outputs, bias=False, device='cuda',
                                         dtype=torch.bfloat16)
                with torch.no_grad():
                    linear.weight.mul_(gain)
                weights.append(nf4_weight(nf4_linear(bnb, linear, torch.bfloat16, True)))
            launches.append(weights)
        made.append(launches)
    return made


def chain_step(matmul, layers, h):
    """The chain: q+k+v of ``h``, o of q, gate+up of o, down of gate, per layer."""
    outputs = []
    for qkv, o, gate_up, down in layers:
        q = matmul.grouped(h, qkv)[0]
        attended = matmul.grouped(q, o)[0]
        gate = matmul.grouped(attended, gate_up)[0]
        h = matmul.grouped(gate, down)[0]
        outputs.append(h)
    return outputs


def pdl(out_path, row_counts, rounds=5, replays=20):
    layers = chain_layers()
    results = {'sm_clock_before': sm_clock(), 'launches': 4 * len(layers), 'runs': []}
    for rows in row_counts:
        matmul = NF4Matmul()
        h = torch.randn(rows, SHAPES[1][1][0][1], device='cuda', dtype=torch.bfloat16)
        chain_step(matmul, layers, h)  # tuned (both kernels), as the engine does
        graphs, finals = {}, {}
        for variant in PDL_VARIANTS:
            nf4_cuda.SOURCE = pdl_source(variant)
            nf4_cuda._KERNELS.clear()
            matmul.overlap_launches = variant != 'plain'
            chain_step(matmul, layers, h)  # compiled outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = chain_step(matmul, layers, h)
            graph.replay()
            torch.cuda.synchronize()
            graphs[variant] = graph
            finals[variant] = [out.clone() for out in outputs]
        nf4_cuda.SOURCE = SHIPPED_SOURCE
        nf4_cuda._KERNELS.clear()
        timings = {variant: [] for variant in PDL_VARIANTS}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(rounds):  # the variants interleaved, so that clock drift hits all
            for variant, graph in graphs.items():
                start.record()
                for _ in range(replays):
                    graph.replay()
                end.record()
                end.synchronize()
                timings[variant].append(start.elapsed_time(end) / replays)
        reference = finals['plain']
        run = {'rows': rows, 'shapes': matmul.tuned_shapes(),
               'final_abs_mean': float(reference[-1].float().abs().mean()),
               'ms_per_chain': timings,
               'best_ms': {variant: min(ms) for variant, ms in timings.items()},
               'identical_to_plain': {variant: all(torch.equal(a, b) for a, b in zip(
                   reference, outs)) for variant, outs in finals.items()}}
        results['runs'].append(run)
        print(rows, 'rows: best ms per chain', {k: round(v, 4) for k, v in run['best_ms'].items()},
              'identical', run['identical_to_plain'], 'final |h| mean',
              round(run['final_abs_mean'], 4), flush=True)
        for graph in graphs.values():
            graph.reset()
    finish(results, out_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('mode', choices=('profile', 'tune-repeat', 'sweep', 'folds', 'pdl',
                                         'folds-v2'))
    parser.add_argument('--out', help='sweep: write the timings here as JSON')
    parser.add_argument('--tables', type=int, nargs='+', default=list(nf4_cuda.TABLE_COPIES),
                        help='sweep: decode table copies (0: in registers)')
    parser.add_argument('--layouts', nargs='+', choices=('stored', 'tiled'),
                        default=['stored'], help='sweep: weight layouts')
    parser.add_argument('--rows', type=int, nargs='+', default=[1, 8], help='sweep: rows')
    parser.add_argument('--x-ahead', type=int, nargs='+', choices=(0, 1), default=[0],
                        help='sweep: x loaded right before its use (0), a block ahead (1)')
    parser.add_argument('--clusters', type=int, nargs='+', choices=(0, 1), default=[0],
                        help="sweep: split reductions added up through a global workspace (0) "
                             "or a thread-block cluster's shared memory (1, sm_90+)")
    parser.add_argument('--overlap', action='store_true',
                        help='sweep: launches with programmatic dependent launch, as the '
                             'decode step makes them')
    parser.add_argument('--baseline', help='folds-v2: an older nf4_cuda.py to time beside')
    arguments = parser.parse_args()
    if arguments.mode == 'folds-v2':
        folds_v2(arguments.out, arguments.rows, arguments.baseline)
        return
    if arguments.mode == 'sweep':
        sweep(arguments.out, arguments.tables, arguments.layouts, arguments.rows,
              [bool(ahead) for ahead in arguments.x_ahead],
              [bool(cluster) for cluster in arguments.clusters], arguments.overlap)
        return
    if arguments.mode == 'folds':
        folds(arguments.out, arguments.rows)
        return
    if arguments.mode == 'pdl':
        pdl(arguments.out, arguments.rows)
        return
    sets = layer_sets()
    if arguments.mode == 'profile':
        profile(sets)
    else:
        tune_repeat(sets)


if __name__ == '__main__':
    main()
