"""Round 2 of the tiny Qwen3-VL spike: easier targets, easier scenes, dense vision supervision.

python docs/default_model_spike/train_round2.py --out DIR [options]

Trains a tiny Qwen3-VL from random init (full parameters) on synthetic scenes with the exact
compact full-vocab loss of common.py, exports a normal checkpoint and evaluates it through
VisionLanguageEngine + Detector + evaluation.evaluate on held-out scenes.
Scenes come from ``easy_scene`` below: the project's shapes, colours and backgrounds
(qwen_vl_perception.scenes helpers) with the number of objects and their scale as parameters.
"""
import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import *  # noqa: E402,F401,F403
from qwen_vl_perception import scenes as _scenes  # noqa: E402
from qwen_vl_perception.labels import GroundTruthObject  # noqa: E402


# ------------------------------------------------------------------------------------------
# Scene generator wrapper (qwen_vl_perception/scenes.py is not changed)

def easy_scene(rng, width, height, n_min=1, n_max=4, scale=(0.22, 0.42)):
    """Like scenes.render_scene, but with the object count range and scale as parameters."""
    image = _scenes._background(rng, width, height)
    wanted = int(rng.integers(n_min, n_max + 1))
    short_side = min(width, height)
    boxes, objects, masks = [], [], []
    color_names = list(COLORS)
    for _ in range(wanted):
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
        shapes = _scenes.SHAPES[category]
        shape = shapes[rng.integers(len(shapes))]
        color = color_names[rng.integers(len(color_names))]
        for attempt in range(30):
            low, high = scale if attempt < 20 else (0.15, scale[0])
            mask = _scenes._shape_mask(category, shape, max(12, int(short_side *
                                                                   rng.uniform(low, high))), rng)
            mask_h, mask_w = mask.shape
            if mask_w > width or mask_h > height:
                continue
            x = int(rng.integers(0, width - mask_w + 1))
            y = int(rng.integers(0, height - mask_h + 1))
            box = (x, y, x + mask_w, y + mask_h)
            if not _scenes._overlaps(box, boxes):
                break
        else:
            continue
        full_mask = np.zeros((height, width), dtype=bool)
        full_mask[y:y + mask_h, x:x + mask_w] = mask
        image[full_mask] = COLORS[color]
        boxes.append(box)
        masks.append(full_mask)
        objects.append(GroundTruthObject(category, tuple(float(v) for v in box),
                                         {'color': color, 'shape': shape}))
    return _scenes.Scene(image, objects, masks)


def make_scene(args, seed, index, n_max=None):
    rng = np.random.default_rng([seed, index])
    sizes = args.sizes
    w, h = sizes[int(rng.integers(len(sizes)))]
    if args.default_scenes:
        return _scenes.render_scene(rng, int(w), int(h))
    return easy_scene(rng, int(w), int(h), args.n_min, n_max or args.n_max,
                      (args.scale_low, args.scale_high))


def quantized_answer(objects, w, h, q):
    """format_answer text; grid boxes rounded to multiples of ``q`` (still 0..1000 ints)."""
    objects = sorted(objects, key=lambda o: (round(o.box[1]), round(o.box[0])))
    parsed = []
    for o in objects:
        box = list(to_grid(o.box, (w, h)))
        if q > 1:
            box = [min(1000, max(0, int(round(v / q)) * q)) for v in box]
            if box[2] <= box[0]:
                box[2] = min(1000, box[0] + q)
            if box[3] <= box[1]:
                box[3] = min(1000, box[1] + q)
        parsed.append(ParsedObject(label=o.label, box=tuple(box),
                                   attributes={'color': o.attributes['color']}))
    return format_answer(parsed, ('color',))


# ------------------------------------------------------------------------------------------

def parse():
    p = argparse.ArgumentParser()
    p.add_argument('--out', required=True)
    p.add_argument('--base', default='', help='processor/tokenizer source (made if empty)')
    p.add_argument('--hidden', type=int, default=128)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--kv', type=int, default=2)
    p.add_argument('--vdepth', type=int, default=2)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--warmup', type=int, default=50)
    p.add_argument('--steps', type=int, default=5000)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--ntrain', type=int, default=5000)
    p.add_argument('--max-pixels', type=int, default=36864)
    p.add_argument('--min-pixels', type=int, default=1024)
    p.add_argument('--sizes', default='320x240,256x256,240x320,400x300')
    p.add_argument('--n-min', type=int, default=1)
    p.add_argument('--n-max', type=int, default=1)
    p.add_argument('--scale-low', type=float, default=0.22)
    p.add_argument('--scale-high', type=float, default=0.42)
    p.add_argument('--default-scenes', action='store_true', help='scenes.render_scene as is')
    p.add_argument('--quant', type=int, default=25, help='round grid boxes to this multiple')
    p.add_argument('--aux', type=float, default=2.0)
    p.add_argument('--pos-scale', type=float, default=1.0,
                   help='init vision pos_embed as 2D sin/cos of this amplitude (0: random)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--neval', type=int, default=40)
    p.add_argument('--eval-every', type=int, default=0)
    p.add_argument('--max-new', type=int, default=200)
    p.add_argument('--time-limit', type=float, default=690, help='seconds of training')
    p.add_argument('--cache', default='', help='torch file to reuse the encoded train set')
    args = p.parse_args()
    args.sizes = [tuple(int(v) for v in s.split('x')) for s in args.sizes.split(',')]
    return args


class AuxHeads(nn.Module):
    """Dense per-visual-token supervision (training only, dropped at export)."""

    def __init__(self, hidden):
        super().__init__()
        self.cls = nn.Linear(hidden, 1 + len(CATEGORIES))
        self.col = nn.Linear(hidden, 1 + len(COLORS))
        self.box = nn.Linear(hidden, 4)

    def loss(self, feats, targets):
        cls = torch.cat([t[0] for t in targets])
        col = torch.cat([t[1] for t in targets])
        box = torch.cat([t[2] for t in targets])
        loss = F.cross_entropy(self.cls(feats), cls) + F.cross_entropy(self.col(feats), col)
        fg = cls > 0
        if fg.any():
            loss = loss + 5 * F.l1_loss(torch.sigmoid(self.box(feats[fg])), box[fg])
        return loss


def sincos_position_table(n_positions, dim, scale):
    """A side x side x dim table of 2D position features (linear ramps + sin/cos) for
    the vision tower's learned position embedding (an initialisation only)."""
    side = int(round(n_positions ** 0.5))
    u = torch.linspace(0, 1, side)
    yy, xx = torch.meshgrid(u, u, indexing='ij')
    feats = [xx * 2 - 1, yy * 2 - 1]
    n_freq = (dim - 2) // 4
    for k in range(n_freq):
        f = math.pi * (0.5 + k * 0.5)
        feats += [torch.sin(f * xx), torch.cos(f * xx), torch.sin(f * yy), torch.cos(f * yy)]
    table = torch.stack(feats, -1).reshape(side * side, -1)
    out = torch.zeros(side * side, dim)
    out[:, :table.shape[1]] = table[:, :dim]
    return out * scale


def token_targets(scene, grid):
    import cv2
    _, gh, gw = grid
    gh, gw = gh // 2, gw // 2
    H, W = scene.image.shape[:2]
    n = gh * gw
    cls = torch.zeros(n, dtype=torch.long)
    col = torch.zeros(n, dtype=torch.long)
    box = torch.zeros(n, 4)
    if scene.objects:
        cov = np.stack([cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
                        for m in scene.masks]).reshape(len(scene.masks), -1)
        best = cov.argmax(0)
        on = cov.max(0) > 0.25
        for t in np.nonzero(on)[0]:
            o = scene.objects[best[t]]
            cls[t] = 1 + CATEGORIES.index(o.label)
            col[t] = 1 + list(COLORS).index(o.attributes['color'])
            x1, y1, x2, y2 = o.box
            box[t] = torch.tensor([x1 / W, y1 / H, x2 / W, y2 / H])
    return cls, col, box


def collate(samples, pad_id):
    L = max(s['input_ids'].shape[1] for s in samples)
    B = len(samples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    typ = torch.zeros((B, L), dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for r, s in enumerate(samples):
        n = s['input_ids'].shape[1]
        ids[r, :n] = s['input_ids'][0]
        att[r, :n] = 1
        typ[r, :n] = s['mm_token_type_ids'][0]
        lab[r, :n] = s['labels'][0]
    return dict(input_ids=ids, attention_mask=att, mm_token_type_ids=typ, labels=lab,
                pixel_values=torch.cat([s['pixel_values'] for s in samples]),
                image_grid_thw=torch.cat([s['image_grid_thw'] for s in samples]))


def export(model, emb, cfg, base, out_dir, args):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, GenerationConfig
    from qwen_vl_perception.model.tiny import copy_processor_files, GENERATION_CONFIG
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    full = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    state = {k: v.detach() for k, v in model.state_dict().items()
             if 'embed_tokens' not in k and 'lm_head' not in k}
    missing, unexpected = full.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all('embed_tokens' in k or 'lm_head' in k for k in missing), missing
    weight = torch.zeros(VOCAB, cfg['text_config']['hidden_size'])
    weight[emb.used] = emb.weight.detach().float()
    full.model.language_model.embed_tokens.weight.data.copy_(weight)
    full.tie_weights()
    full.generation_config = GenerationConfig(**GENERATION_CONFIG)
    full.eval().save_pretrained(out_dir)
    copy_processor_files(base, out_dir)
    pc = json.loads((out_dir / 'preprocessor_config.json').read_text())
    pc['size'] = {'shortest_edge': args.min_pixels, 'longest_edge': args.max_pixels}
    (out_dir / 'preprocessor_config.json').write_text(json.dumps(pc, indent=2))
    return out_dir


def evaluate_checkpoint(ckpt, args, default_scenes=False):
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    from qwen_vl_perception.detector import Detector, DetectionSettings
    from qwen_vl_perception.evaluation import evaluate
    from qwen_vl_perception.labels import LabeledImage
    engine = VisionLanguageEngine(ckpt, device='cpu', quantization='none',
                                  min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                  compute_dtype='float32')
    det = Detector(engine, DetectionSettings(categories=CATEGORIES, describe=True,
                                             attributes=('color',),
                                             max_new_tokens=args.max_new))
    saved = args.default_scenes
    args.default_scenes = default_scenes or saved
    scenes = [make_scene(args, 10_000 + args.seed, i) for i in range(args.neval)]
    args.default_scenes = saved
    gts, preds, texts = [], {}, []
    t0 = time.time()
    for start in range(0, len(scenes), 8):
        chunk = scenes[start:start + 8]
        frames = det.detect([s.image for s in chunk])
        for j, (scene, frame) in enumerate(zip(chunk, frames)):
            name = f'eval_{start + j:04d}.png'
            gts.append(LabeledImage(name, scene.image.shape[1], scene.image.shape[0],
                                    scene.objects))
            preds[name] = frame.detections
            texts.append(frame.raw_text)
    rep = evaluate(gts, preds, categories=CATEGORIES)
    color = rep.attributes.get('color')
    res = dict(precision=rep.precision, recall=rep.recall,
               color=color.accuracy if color else None, eval_s=round(time.time() - t0, 1),
               n=len(gts), objects=sum(len(g.objects) for g in gts))
    engine.close()
    return res, texts


def ensure_base(args):
    if args.base and Path(args.base).is_dir():
        return Path(args.base)
    from qwen_vl_perception.model.tiny import make_tiny_checkpoint
    base = Path(args.out) / 'base'
    if not (base / 'config.json').exists():
        make_tiny_checkpoint(base)
    return base


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    t_start = time.time()
    base = ensure_base(args)
    cfg = make_config(args.hidden, args.layers, args.heads, args.kv, None, args.vdepth)
    instr = PromptBuilder(CATEGORIES, describe=True, attributes=('color',)).instruction
    builder = InputBuilder.from_pretrained(base, args.min_pixels, args.max_pixels,
                                           image_backend='pil')
    used = used_token_ids(builder, instr)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    emb = CompactEmbedding(used, args.hidden)
    model.model.language_model.embed_tokens = emb
    model.lm_head = nn.Identity()
    if args.pos_scale:
        pe = model.model.visual.pos_embed
        pe.weight.data.copy_(sincos_position_table(pe.weight.shape[0], pe.weight.shape[1],
                                                   args.pos_scale))
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    print(f'params (compact) {nparams / 1e6:.2f}M', flush=True)

    def sample(i):
        scene = make_scene(args, args.seed, i)
        img = scene.image
        ans = quantized_answer(scene.objects, img.shape[1], img.shape[0], args.quant)
        b = training_batch(builder, [img], [instr], [ans])
        b['aux'] = token_targets(scene, b['image_grid_thw'][0].tolist())
        return b

    t0 = time.time()
    if args.cache and Path(args.cache).exists():
        cache = torch.load(args.cache, weights_only=False)
    else:
        cache = [sample(i) for i in range(args.ntrain)]
        if args.cache:
            torch.save(cache, args.cache)
    data_s = time.time() - t0
    print(f'data {len(cache)} samples in {data_s:.1f}s', flush=True)
    print(quantized_answer(make_scene(args, 0, 0).objects, 320, 240, args.quant), flush=True)

    heads = AuxHeads(args.hidden)
    captured = {}
    model.model.visual.merger.register_forward_hook(
        lambda m, i, o: captured.__setitem__('v', o))
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(s, elapsed):
        """Warmup, then cosine over whichever runs out first: steps or the time limit."""
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        pr = max((s - args.warmup) / max(1, args.steps - args.warmup),
                 elapsed / args.time_limit)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(pr, 1.0))))
    rng = np.random.default_rng(args.seed + 1)
    n_rest = VOCAB - len(used)
    t_train = time.time()
    ema = aux_ema = None
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group['lr'] = lr_at(step, time.time() - t_train)
        samples = [cache[i] for i in rng.integers(0, len(cache), args.batch)]
        batch = collate(samples, builder.pad_token_id)
        labels = batch.pop('labels')
        hidden = model.model(**batch).last_hidden_state
        loss = exact_loss(hidden, labels, emb, n_rest)
        total = loss
        if args.aux:
            aux = heads.loss(captured['v'], [s['aux'] for s in samples])
            total = loss + args.aux * aux
            aux_ema = aux.item() if aux_ema is None else 0.95 * aux_ema + 0.05 * aux.item()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f'step {step} loss {loss.item():.4f} ema {ema:.4f} aux {aux_ema or 0:.3f} '
                  f'{el:.0f}s ({el / (step + 1) * 1000:.0f} ms/step)', flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            ck = export(model, emb, cfg, base, Path(args.out) / 'ckpt_mid', args)
            with torch.no_grad():
                r, _ = evaluate_checkpoint(ck, args)
            print(f'EVAL step {step + 1} {json.dumps(r)}', flush=True)
            model.train()
        if time.time() - t_train >= args.time_limit:
            print('time limit', flush=True)
            break
    train_s = time.time() - t_train
    total_s = time.time() - t_start
    model.eval()
    ckpt = export(model, emb, cfg, base, Path(args.out) / 'ckpt', args)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    res, texts = evaluate_checkpoint(ckpt, args)
    res.update(train_s=round(train_s, 1), data_s=round(data_s, 1), total_s=round(total_s, 1),
               steps=step + 1, ms_per_step=round(train_s / (step + 1) * 1000),
               final_ema=ema, ckpt_bytes=size)
    print(json.dumps(res), flush=True)
    print('sample answers:\n' + texts[0] + '\n' + texts[1], flush=True)
    res.update(args={k: v for k, v in vars(args).items()}, config=cfg)
    (Path(args.out) / 'result.json').write_text(json.dumps(res, indent=2, default=str))


if __name__ == '__main__':
    main()
