"""Train a tiny Qwen3-VL on synthetic scenes, export a full checkpoint, evaluate with Detector.

python train.py --out DIR [--hidden 128 --layers 2 --vdepth 2 --lr 2e-3 --steps 1000 ...]
"""
import argparse, json, math, shutil, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from common import *


def parse():
    p = argparse.ArgumentParser()
    p.add_argument('--out', required=True)
    p.add_argument('--base', default=str(Path(__file__).parent / 'base'))
    p.add_argument('--hidden', type=int, default=128)
    p.add_argument('--inter', type=int, default=0)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--kv', type=int, default=2)
    p.add_argument('--vdepth', type=int, default=2)
    p.add_argument('--vhidden', type=int, default=0)
    p.add_argument('--vheads', type=int, default=4)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--wd', type=float, default=0.0)
    p.add_argument('--warmup', type=int, default=50)
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--ntrain', type=int, default=2000)
    p.add_argument('--max-pixels', type=int, default=65536)
    p.add_argument('--min-pixels', type=int, default=1024)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--neval', type=int, default=40)
    p.add_argument('--eval-every', type=int, default=0)
    p.add_argument('--max-new', type=int, default=200)
    p.add_argument('--aux', type=float, default=0.0)
    p.add_argument('--time-limit', type=float, default=1e9)
    return p.parse_args()


class AuxHeads(nn.Module):
    """Dense per-visual-token supervision (training only, dropped at export)."""

    def __init__(self, hidden):
        super().__init__()
        self.cls = nn.Linear(hidden, 1 + len(CATEGORIES))
        self.col = nn.Linear(hidden, 1 + len(COLORS))
        self.box = nn.Linear(hidden, 4)

    def loss(self, feats, targets, device):
        cls = torch.cat([t[0] for t in targets]).to(device)
        col = torch.cat([t[1] for t in targets]).to(device)
        box = torch.cat([t[2] for t in targets]).to(device)
        assert feats.shape[0] == cls.shape[0], (feats.shape, cls.shape)
        l = F.cross_entropy(self.cls(feats), cls) + F.cross_entropy(self.col(feats), col)
        fg = cls > 0
        if fg.any():
            l = l + 5 * F.l1_loss(torch.sigmoid(self.box(feats[fg])), box[fg])
        return l


def token_targets(scene, grid):
    import cv2
    _, gh, gw = grid
    gh, gw = gh // 2, gw // 2
    H, W = scene.image.shape[:2]
    n = gh * gw
    cls = torch.zeros(n, dtype=torch.long); col = torch.zeros(n, dtype=torch.long)
    box = torch.zeros(n, 4)
    if scene.objects:
        cov = np.stack([cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
                        for m in scene.masks]).reshape(len(scene.masks), -1)
        best = cov.argmax(0); on = cov.max(0) > 0.25
        for t in np.nonzero(on)[0]:
            o = scene.objects[best[t]]
            cls[t] = 1 + CATEGORIES.index(o.label)
            col[t] = 1 + list(COLORS).index(o.attributes['color'])
            x1, y1, x2, y2 = o.box
            box[t] = torch.tensor([x1 / W, y1 / H, x2 / W, y2 / H])
    return cls, col, box


def collate(samples, pad_id, device):
    L = max(s['input_ids'].shape[1] for s in samples)
    B = len(samples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    typ = torch.zeros((B, L), dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for r, s in enumerate(samples):
        n = s['input_ids'].shape[1]
        ids[r, :n] = s['input_ids'][0]; att[r, :n] = 1
        typ[r, :n] = s['mm_token_type_ids'][0]; lab[r, :n] = s['labels'][0]
    out = dict(input_ids=ids, attention_mask=att, mm_token_type_ids=typ, labels=lab,
               pixel_values=torch.cat([s['pixel_values'] for s in samples]),
               image_grid_thw=torch.cat([s['image_grid_thw'] for s in samples]))
    return {k: v.to(device) for k, v in out.items()}


def export(model, emb, cfg, base, out_dir):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, GenerationConfig
    from qwen_vl_perception.model.tiny import copy_processor_files, GENERATION_CONFIG
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    full = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if 'embed_tokens' not in k and 'lm_head' not in k}
    missing, unexpected = full.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all('embed_tokens' in k or 'lm_head' in k for k in missing), missing
    weight = torch.zeros(VOCAB, cfg['text_config']['hidden_size'])
    weight[emb.used] = emb.weight.detach().cpu().float()
    full.model.language_model.embed_tokens.weight.data.copy_(weight)
    full.tie_weights()
    assert full.lm_head.weight.data_ptr() == full.model.language_model.embed_tokens.weight.data_ptr()
    full.generation_config = GenerationConfig(**GENERATION_CONFIG)
    full.eval().save_pretrained(out_dir)
    copy_processor_files(base, out_dir)
    return out_dir


def _safe(f):
    try:
        return f()
    except Exception:
        return None


def set_budget(ckpt, args):
    pc = json.loads((ckpt / 'preprocessor_config.json').read_text())
    pc['size'] = {'shortest_edge': args.min_pixels, 'longest_edge': args.max_pixels}
    (ckpt / 'preprocessor_config.json').write_text(json.dumps(pc, indent=2))


def evaluate_checkpoint(ckpt, args, device):
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    from qwen_vl_perception.detector import Detector, DetectionSettings
    from qwen_vl_perception import evaluation
    from qwen_vl_perception.evaluation import evaluate
    try:
        import pycocotools  # noqa
    except ImportError:  # GPU box: AP needs pycocotools; precision/recall/colour do not
        evaluation._coco_ap = lambda images, kept, names: {}
    from qwen_vl_perception.labels import LabeledImage
    engine = VisionLanguageEngine(ckpt, device=device, quantization='none',
                                  min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                  compute_dtype='float32')
    det = Detector(engine, DetectionSettings(categories=CATEGORIES, describe=True,
                                             attributes=('color',), max_new_tokens=args.max_new))
    gts, preds, texts = [], {}, []
    t0 = time.time()
    bs = 8
    scenes = [scene_example(10_000 + args.seed, i) for i in range(args.neval)]
    for start in range(0, len(scenes), bs):
        chunk = scenes[start:start + bs]
        frames = det.detect([img for img, _ in chunk])
        for j, ((img, objs), fr) in enumerate(zip(chunk, frames)):
            name = f'eval_{start + j:04d}.png'
            gts.append(LabeledImage(name, img.shape[1], img.shape[0], objs))
            preds[name] = fr.detections
            texts.append(fr.raw_text)
    rep = evaluate(gts, preds, categories=CATEGORIES)
    color = rep.attributes.get('color')
    res = dict(precision=rep.precision, recall=rep.recall,
               color=color.accuracy if color else None, map50=_safe(lambda: rep.map50),
               eval_s=time.time() - t0, n=len(gts))
    engine.close()
    return res, texts


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    cfg = make_config(args.hidden, args.layers, args.heads, args.kv, args.inter or None,
                      args.vdepth, args.vhidden or None, None, args.vheads)
    instr = PromptBuilder(CATEGORIES, describe=True, attributes=('color',)).instruction
    builder = InputBuilder.from_pretrained(args.base, args.min_pixels, args.max_pixels,
                                           image_backend='pil')
    used = used_token_ids(builder, instr)
    t_start = time.time()
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    emb = CompactEmbedding(used, args.hidden)
    model.model.language_model.embed_tokens = emb
    model.lm_head = nn.Identity()  # unused in training
    model.to(device).train()
    emb.used = emb.used
    nparams = sum(p.numel() for p in model.parameters())
    print(f'params (compact) {nparams/1e6:.2f}M, full-vocab {(nparams + (VOCAB-len(used))*args.hidden)/1e6:.2f}M', flush=True)

    # dataset
    t0 = time.time()
    cache = []
    def sample(i):
        scene = scene_render(args.seed, i)
        img, objs = scene.image, scene.objects
        ans = answer_for(objs, img.shape[1], img.shape[0])
        b = training_batch(builder, [img], [instr], [ans])
        if args.aux:
            b['aux'] = token_targets(scene, b['image_grid_thw'][0].tolist())
        return b
    if args.ntrain > 0:
        cache = [sample(i) for i in range(args.ntrain)]
    print(f'data {args.ntrain} samples in {time.time()-t0:.1f}s', flush=True)

    heads = AuxHeads(args.hidden).to(device)
    captured = {}
    model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.__setitem__('v', o))
    opt = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=args.lr, weight_decay=args.wd,
                            betas=(0.9, 0.98))
    def lr_at(s):
        if s < args.warmup:
            return (s + 1) / args.warmup
        pr = (s - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(pr, 1.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(args.seed + 1)
    n_rest = VOCAB - len(used)
    t_train = time.time()
    ema = None
    step = 0
    for step in range(args.steps):
        if args.ntrain > 0:
            idx = rng.integers(0, len(cache), args.batch)
            samples = [cache[i] for i in idx]
        else:
            samples = [sample(1_000_000 + step * args.batch + k) for k in range(args.batch)]
        batch = collate(samples, builder.pad_token_id, device)
        labels = batch.pop('labels')
        hidden = model.model(**batch).last_hidden_state
        loss = exact_loss(hidden, labels, emb, n_rest)
        total = loss
        if args.aux:
            aux = heads.loss(captured['v'], [s['aux'] for s in samples], device)
            total = loss + args.aux * aux
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True); sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f'step {step} aux {(aux.item() if args.aux else 0):.3f} loss {loss.item():.4f} ema {ema:.4f} {el:.1f}s '
                  f'({el/(step+1)*1000:.0f} ms/step)', flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            ck = export(model, emb, cfg, args.base, Path(args.out) / 'ckpt_mid')
            set_budget(ck, args)
            with torch.no_grad():
                r, _ = evaluate_checkpoint(ck, args, args.device)
            print(f'EVAL step {step+1} {json.dumps(r)}', flush=True)
            model.train()
        if time.time() - t_start > args.time_limit:
            print('time limit', flush=True); break
    train_s = time.time() - t_train
    total_s = time.time() - t_start
    model.eval()
    ckpt = export(model, emb, cfg, args.base, Path(args.out) / 'ckpt')
    set_budget(ckpt, args)
    res, texts = evaluate_checkpoint(ckpt, args, args.device)
    res.update(train_s=train_s, total_s=total_s, steps=step + 1,
               ms_per_step=train_s / (step + 1) * 1000, final_ema=ema, args=vars(args), config=cfg)
    print(json.dumps({k: v for k, v in res.items() if k not in ('args', 'config')}), flush=True)
    print('sample answer:\n' + texts[0] + '\n' + texts[1], flush=True)
    (Path(args.out) / 'result.json').write_text(json.dumps(res, indent=2))


if __name__ == '__main__':
    main()
