"""Deterministic synthetic scenes: a few large, strongly coloured shapes on varied backgrounds.

Made to fine-tune and test a tiny Qwen3-VL, so the task stays learnable: four categories,
each drawn as one shape, five saturated colours, muted backgrounds (gradients, noise,
stripes, checkers), 1-4 objects that never overlap, each at least ~15% of the image's short
side. Boxes are tight around every drawn pixel in continuous pixel coordinates (an object
covering columns 10..49 has ``x1=10, x2=50``).

Every scene depends only on its seed: ``write_dataset`` derives image ``i``'s generator from
``(seed, i)``, so a dataset of 100 images starts with the same 10 images as one of 10.
"""
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from qwen_vl_perception.data.labels import (FORMATS, GroundTruthObject, LabeledImage, write_coco,
                                            write_labelme, write_yolo)
from qwen_vl_perception.tool_support import unlink_links

CATEGORIES = ('ball', 'box', 'cone', 'ring')
"""Category names; each is drawn as one shape (see ``SHAPES``)."""

SHAPES = {'ball': ('circle',), 'box': ('square', 'rectangle'), 'cone': ('triangle',),
          'ring': ('ring',)}
"""The ``shape`` attribute values each category can have."""

COLORS: Dict[str, Tuple[int, int, int]] = {
    'red': (220, 30, 30),
    'green': (30, 170, 40),
    'blue': (30, 70, 230),
    'yellow': (245, 215, 20),
    'purple': (150, 40, 190),
}
"""The ``color`` attribute values and their RGB."""

DEFAULT_SIZES: Tuple[Tuple[int, int], ...] = ((320, 240), (256, 256), (240, 320), (400, 300))
"""(width, height) choices; all about 64k-120k pixels."""

BACKGROUNDS = ('gradient', 'noise', 'stripes', 'checker')

COCO_FILE = 'annotations.json'
IMAGE_DIR = 'images'
_MAX_BACKGROUND_SATURATION = 55  # of 255 in HSV: backgrounds stay greyish
_GAP = 6  # pixels kept free between objects' boxes

Rng = Union[np.random.Generator, int]


@dataclass
class Scene:
    """A rendered scene: RGB image, its objects and each object's pixel mask."""

    image: np.ndarray
    objects: List[GroundTruthObject]
    masks: List[np.ndarray]


def _generator(rng: Rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# --------------------------------------------------------------------------------------------
# Backgrounds


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A random greyish RGB colour (low saturation, mid to high value)."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(0, _MAX_BACKGROUND_SATURATION),
                      rng.integers(90, 236)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    first, second = _muted_color(rng), _muted_color(rng)
    if kind == 'gradient':
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        image = first * (1 - t[..., None]) + second * t[..., None]
    elif kind == 'noise':
        image = np.broadcast_to(first, (height, width, 3)).copy()
        image += rng.normal(0.0, 12.0, size=(height, width, 1)).astype(np.float32)
    elif kind == 'stripes':
        period = int(rng.integers(12, 40))
        ys, xs = np.mgrid[0:height, 0:width]
        coordinate = ys if rng.integers(2) else xs + ys * int(rng.integers(0, 2))
        band = ((coordinate // period) % 2).astype(np.float32)[..., None]
        image = first * (1 - band) + second * band
    else:
        cell = int(rng.integers(16, 48))
        ys, xs = np.mgrid[0:height, 0:width]
        band = (((ys // cell) + (xs // cell)) % 2).astype(np.float32)[..., None]
        image = first * (1 - band) + second * band
    return np.clip(image, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Shapes


def _shape_mask(category: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of the shape, cropped tight (at most ``size`` pixels on a side)."""
    if shape == 'rectangle':
        long_side, short_side = size, int(round(size * rng.uniform(0.45, 0.65)))
        canvas_size = (short_side, long_side) if rng.integers(2) else (long_side, short_side)
        mask = np.ones(canvas_size, dtype=np.uint8)
    elif shape == 'square':
        mask = np.ones((size, size), dtype=np.uint8)
    elif shape == 'circle':
        mask = np.zeros((size, size), dtype=np.uint8)
        radius = (size - 1) // 2
        cv2.circle(mask, (radius, radius), radius, 1, thickness=-1, lineType=cv2.LINE_8)
    elif shape == 'ring':
        mask = np.zeros((size, size), dtype=np.uint8)
        radius = (size - 1) // 2
        cv2.circle(mask, (radius, radius), radius, 1, thickness=-1, lineType=cv2.LINE_8)
        inner = int(round(radius * rng.uniform(0.45, 0.6)))
        cv2.circle(mask, (radius, radius), inner, 0, thickness=-1, lineType=cv2.LINE_8)
    elif shape == 'triangle':
        width = size
        height = int(round(size * rng.uniform(0.85, 1.15)))
        mask = np.zeros((height, width), dtype=np.uint8)
        apex = (width - 1) // 2
        points = np.array([[apex, 0], [0, height - 1], [width - 1, height - 1]], np.int32)
        cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8)
    else:
        raise ValueError(f'unknown shape {shape!r} for {category!r}')
    rows, cols = np.nonzero(mask)
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].astype(bool)


def _overlaps(box: Tuple[int, int, int, int], others: Sequence[Tuple[int, int, int, int]]
              ) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < ox2 + _GAP and ox1 < x2 + _GAP and y1 < oy2 + _GAP and oy1 < y2 + _GAP
               for ox1, oy1, ox2, oy2 in others)


def render_scene(rng: Rng, width: int, height: int, min_objects: int = 1,
                 max_objects: int = 4) -> Scene:
    """Render one scene; see :func:`generate_scene`. Also returns each object's mask.

    The scene asks for ``min_objects..max_objects`` objects (uniformly); one that finds no
    free room is left out, so a crowded scene can have fewer.
    """
    if width < 64 or height < 64:
        raise ValueError(f'scenes need at least 64x64 pixels, got {width}x{height}')
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f'need 0 <= min_objects <= max_objects, got {min_objects}, '
                         f'{max_objects}')
    rng = _generator(rng)
    image = _background(rng, width, height)
    wanted = int(rng.integers(min_objects, max_objects + 1))
    short_side = min(width, height)
    boxes: List[Tuple[int, int, int, int]] = []
    objects: List[GroundTruthObject] = []
    masks: List[np.ndarray] = []
    color_names = list(COLORS)
    for _ in range(wanted):
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
        shapes = SHAPES[category]
        shape = shapes[rng.integers(len(shapes))]
        color = color_names[rng.integers(len(color_names))]
        low, high = 0.22, 0.42
        for attempt in range(30):
            scale = rng.uniform(low, high) if attempt < 20 else rng.uniform(0.15, low)
            mask = _shape_mask(category, shape, max(12, int(short_side * scale)), rng)
            mask_h, mask_w = mask.shape
            if mask_w > width or mask_h > height:
                continue
            x = int(rng.integers(0, width - mask_w + 1))
            y = int(rng.integers(0, height - mask_h + 1))
            box = (x, y, x + mask_w, y + mask_h)
            if not _overlaps(box, boxes):
                break
        else:
            continue  # no room left for this object: the scene gets fewer
        full_mask = np.zeros((height, width), dtype=bool)
        full_mask[y:y + mask_h, x:x + mask_w] = mask
        image[full_mask] = COLORS[color]
        boxes.append(box)
        masks.append(full_mask)
        objects.append(GroundTruthObject(category, tuple(float(v) for v in box),
                                         {'color': color, 'shape': shape}))
    return Scene(image, objects, masks)


def generate_scene(rng: Rng, width: int, height: int, min_objects: int = 1,
                   max_objects: int = 4) -> Tuple[np.ndarray, List[GroundTruthObject]]:
    """A ``height x width x 3`` RGB uint8 image and its objects (1-4 by default; tight
    pixel boxes).

    ``rng`` is a seed or a ``numpy.random.Generator``; the same seed gives the same scene.
    Objects carry attributes ``{"color": ..., "shape": ...}``.
    """
    scene = render_scene(rng, width, height, min_objects, max_objects)
    return scene.image, scene.objects


# --------------------------------------------------------------------------------------------
# Depth


@dataclass
class DepthScene:
    """A depth image registered to a scene's colour image, and what it shows.

    ``depth_m``: (H, W) float32 metres, NaN where there is no reading. ``object_depths``: each
    object's distance along the optical axis (its surface faces the camera). ``camera_k``:
    the row-major 3x3 camera matrix both images share. ``positions``: each object's true
    centre (x, y, z) in the optical frame: its box centre deprojected at its depth.
    """

    depth_m: np.ndarray
    object_depths: List[float]
    camera_k: Tuple[float, ...]
    positions: List[Tuple[float, float, float]]


def camera_matrix(width: int, height: int, horizontal_fov_deg: float = 60.0
                  ) -> Tuple[float, ...]:
    """A pinhole camera matrix for a ``width`` x ``height`` image (square pixels, principal
    point at the image centre; ROS's pixel convention: pixel centres at integers)."""
    fx = (width / 2.0) / np.tan(np.radians(horizontal_fov_deg) / 2.0)
    return (fx, 0.0, (width - 1) / 2.0, 0.0, fx, (height - 1) / 2.0, 0.0, 0.0, 1.0)


def render_depth(scene: Scene, rng: Rng, near: float = 1.0, far: float = 5.0,
                 noise: float = 0.0, holes: float = 0.0,
                 camera_k: Optional[Sequence[float]] = None) -> DepthScene:
    """Depth for ``scene``: every object a surface facing the camera at its own depth, drawn
    uniformly from [``near``, ``far``] m; the background a sloping wall 1.5-3.5 m behind the
    farthest object. ``noise``: relative standard deviation of Gaussian depth noise (0.01 is
    1%); ``holes``: the fraction of pixels, chosen at random, without a reading (NaN)."""
    rng = _generator(rng)
    height, width = scene.image.shape[:2]
    k = tuple(camera_k) if camera_k is not None else camera_matrix(width, height)
    depths = [float(rng.uniform(near, far)) for _ in scene.objects]
    wall = max(depths + [far]) + rng.uniform(1.5, 2.5)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    depth = np.broadcast_to(wall + rows * rng.uniform(0.0, 1.0), (height, width)).copy()
    for mask, z in zip(scene.masks, depths):
        depth[mask] = z
    if noise > 0.0:
        depth *= 1.0 + rng.normal(0.0, noise, size=depth.shape)
    if holes > 0.0:
        depth[rng.random(depth.shape) < holes] = np.nan
    fx, cx, fy, cy = k[0], k[2], k[4], k[5]
    positions = []
    for obj, z in zip(scene.objects, depths):
        x1, y1, x2, y2 = obj.box
        u, v = (x1 + x2) / 2.0 - 0.5, (y1 + y2) / 2.0 - 0.5  # continuous -> pixel centres
        positions.append(((u - cx) * z / fx, (v - cy) * z / fy, z))
    return DepthScene(depth.astype(np.float32), depths, k, positions)


def depth_to_millimetres(depth_m: np.ndarray) -> np.ndarray:
    """Metres (NaN = no reading) -> uint16 millimetres with 0 for no reading (16UC1)."""
    millimetres = np.nan_to_num(depth_m * 1000.0, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(millimetres), 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# Datasets


def image_name(index: int) -> str:
    return f'scene_{index:05d}.png'


def _dataset_files(out_dir: Path) -> List[Path]:
    """Files a previous ``write_dataset`` may have left in ``out_dir`` (and only those)."""
    files = sorted((out_dir / IMAGE_DIR).glob('scene_*.png'))
    files += sorted((out_dir / IMAGE_DIR).glob('scene_*.json'))
    files += sorted((out_dir / 'labels').glob('scene_*.txt'))
    files += [out_dir / name for name in (COCO_FILE, 'classes.txt', 'data.yaml')]
    return [path for path in files if path.is_file()]


def write_dataset(out_dir, count: int, seed: int,
                  sizes: Sequence[Tuple[int, int]] = DEFAULT_SIZES,
                  format: Union[str, Sequence[str]] = 'coco',
                  overwrite: bool = False, min_objects: int = 1,
                  max_objects: int = 4) -> List[LabeledImage]:
    """Write ``count`` scenes as PNGs plus labels in one or several formats.

    Layout of ``out_dir``: ``images/scene_00000.png`` ..., and per format
    ``annotations.json`` (coco), ``labels/*.txt`` + ``classes.txt`` + ``data.yaml`` (yolo),
    ``images/scene_00000.json`` beside each image (labelme). Refuses a non-empty ``out_dir``
    unless ``overwrite``, which first deletes only files this function writes.
    ``min_objects``/``max_objects``: objects asked for per scene (see :func:`render_scene`).
    Returns the written images' labels.
    """
    formats = [format] if isinstance(format, str) else list(format)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f'unknown format(s) {unknown or formats}; expected some of {FORMATS}')
    if count < 1:
        raise ValueError(f'count must be at least 1, got {count}')
    if not sizes:
        raise ValueError('sizes must not be empty')
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f'need 0 <= min_objects <= max_objects, got {min_objects}, '
                         f'{max_objects}')
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'{out_dir}: exists and is not a folder')
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f'{out_dir} exists and is not empty (overwrite=True replaces '
                                  'the dataset there)')
        unlink_links(out_dir)  # never write through a link to something elsewhere
        for path in _dataset_files(out_dir):
            path.unlink()
        labels_dir = out_dir / 'labels'
        if labels_dir.is_dir() and not any(labels_dir.iterdir()):
            shutil.rmtree(labels_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)

    images: List[LabeledImage] = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        width, height = sizes[int(rng.integers(len(sizes)))]
        scene = render_scene(rng, int(width), int(height), min_objects, max_objects)
        path = out_dir / IMAGE_DIR / image_name(index)
        if not cv2.imwrite(str(path), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f'{path}: could not write the image')
        images.append(LabeledImage(str(path), int(width), int(height), scene.objects))

    if 'coco' in formats:
        write_coco(images, out_dir / COCO_FILE, categories=CATEGORIES)
    if 'yolo' in formats:
        write_yolo(images, out_dir, categories=CATEGORIES)
    if 'labelme' in formats:
        for image in images:
            write_labelme(image, Path(image.image_path).with_suffix('.json'))
    return images


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    """Parse ``"320x240,256x256"`` into ``[(320, 240), (256, 256)]``."""
    sizes = []
    for item in text.split(','):
        item = item.strip().lower()
        width, sep, height = item.partition('x')
        if not sep or not width.isdigit() or not height.isdigit():
            raise ValueError(f'size {item!r} is not WIDTHxHEIGHT')
        sizes.append((int(width), int(height)))
    return sizes


__all__ = ['CATEGORIES', 'COLORS', 'DEFAULT_SIZES', 'DepthScene', 'SHAPES', 'Scene',
           'camera_matrix', 'depth_to_millimetres', 'generate_scene', 'image_name',
           'parse_sizes', 'render_depth', 'render_scene', 'write_dataset']
