"""Spike: train a tiny Qwen3-VL on synthetic scenes with an exact, cheap full-vocab loss.

Trick: every embedding row of a token that never occurs in training data is zero and stays
zero (it gets no gradient). Its logit is then exactly 0 for every hidden state, so the full
151,936-way cross entropy equals a softmax over the K used rows plus (V-K) logits of 0:
  loss = -z_y + logsumexp([z_used..., log(V-K)]).
Training holds only the K used rows (CompactEmbedding); export scatters them into a zero
151936 x H matrix (tied lm_head), so the saved checkpoint is a normal Qwen3-VL.
"""
import copy, json, math, os, sys, time
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, '/work/main')
from qwen_vl_perception.scenes import generate_scene, DEFAULT_SIZES, CATEGORIES, COLORS
from qwen_vl_perception.prompt import PromptBuilder, format_answer
from qwen_vl_perception.detection import ParsedObject
from qwen_vl_perception.geometry import to_grid
from qwen_vl_perception.model.configs import tiny_config
from qwen_vl_perception.model.processor import InputBuilder
from qwen_vl_perception.model.training import training_batch, IGNORE_INDEX

VOCAB = 151936


def make_config(hidden=128, layers=2, heads=4, kv=2, inter=None, vdepth=2, vhidden=None,
                vinter=None, vheads=4):
    cfg = tiny_config()
    t, v = cfg['text_config'], cfg['vision_config']
    head_dim = hidden // heads
    t.update(hidden_size=hidden, intermediate_size=inter or 2 * hidden, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)
    half = head_dim // 2
    a = half // 3
    t['rope_scaling'] = {'rope_type': 'default', 'mrope_section': [half - 2 * a, a, a],
                         'mrope_interleaved': True}
    vh = vhidden or hidden
    v.update(depth=vdepth, hidden_size=vh, intermediate_size=vinter or 2 * vh, num_heads=vheads,
             out_hidden_size=hidden, deepstack_visual_indexes=[vdepth - 1])
    return cfg


def scene_example(seed, index, categories=CATEGORIES, sizes=DEFAULT_SIZES):
    rng = np.random.default_rng([seed, index])
    w, h = sizes[int(rng.integers(len(sizes)))]
    image, objects = generate_scene(rng, int(w), int(h))
    return image, objects


SORT = os.environ.get('SPIKE_SORT', '1') == '1'


def scene_render(seed, index, sizes=DEFAULT_SIZES):
    from qwen_vl_perception.scenes import render_scene
    rng = np.random.default_rng([seed, index])
    w, h = sizes[int(rng.integers(len(sizes)))]
    return render_scene(rng, int(w), int(h))


def answer_for(objects, w, h):
    if SORT:  # reading order: top to bottom, then left to right (a learnable target order)
        objects = sorted(objects, key=lambda o: (round(o.box[1]), round(o.box[0])))
    parsed = [ParsedObject(label=o.label, box=to_grid(o.box, (w, h)), attributes=dict(o.attributes))
              for o in objects]
    return format_answer(parsed, ('color',))


class CompactEmbedding(nn.Module):
    def __init__(self, used_ids, hidden, std=0.02):
        super().__init__()
        remap = torch.full((VOCAB,), 0, dtype=torch.long)
        remap[torch.tensor(used_ids)] = torch.arange(len(used_ids))
        self.register_buffer('remap', remap, persistent=False)
        self.used = torch.tensor(used_ids)
        self.weight = nn.Parameter(torch.randn(len(used_ids), hidden) * std)

    def forward(self, ids):
        return F.embedding(self.remap[ids], self.weight)


def exact_loss(hidden, labels, emb, n_rest):
    """Full-vocab CE for a model whose non-used rows are zero (tied head)."""
    h = hidden[:, :-1]
    y = labels[:, 1:]
    mask = y != IGNORE_INDEX
    hs = h[mask]
    ys = emb.remap[y[mask]]
    z = hs @ emb.weight.t()
    rest = torch.full((z.shape[0], 1), math.log(n_rest), dtype=z.dtype, device=z.device)
    lse = torch.logsumexp(torch.cat([z, rest], 1), 1)
    return (lse - z.gather(1, ys[:, None])[:, 0]).mean()


def used_token_ids(builder, instruction):
    ids = set(builder.prompt_ids(instruction)[0])
    tok = builder.tokenizer
    # every token any answer can contain: digits, punctuation, labels, colors, fences
    probe = []
    from qwen_vl_perception.scenes import COLORS
    for c in CATEGORIES:
        for col in COLORS:
            probe.append(ParsedObject(label=c, box=(0, 10, 999, 1000), attributes={'color': col}))
    text = format_answer(probe, ('color',)) + format_answer([], ('color',))
    text += ' 0123456789 ' + ''.join(f'[{i}, ' for i in range(1001))
    ids |= set(tok(text, add_special_tokens=False)['input_ids'])
    ids |= {151645, 151643, 151655, 151652, 151653, 151644, 198}
    return sorted(ids)
