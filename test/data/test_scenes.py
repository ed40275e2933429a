"""Tests of the synthetic scene generator and tools/make_scenes.py."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tool_runs import load_tool

from qwen_vl_perception.data.labels import load_labels
from qwen_vl_perception.data.scenes import (CATEGORIES, COLORS, DEFAULT_SIZES, SHAPES,
                                            generate_scene, parse_sizes, render_scene,
                                            write_dataset)


def test_same_seed_same_scene_different_seed_different_scene():
    image_a, objects_a = generate_scene(123, 320, 240)
    image_b, objects_b = generate_scene(np.random.default_rng(123), 320, 240)
    assert image_a.dtype == np.uint8 and image_a.shape == (240, 320, 3)
    assert image_a.tobytes() == image_b.tobytes() and objects_a == objects_b
    image_c, _ = generate_scene(124, 320, 240)
    assert image_a.tobytes() != image_c.tobytes()


@pytest.mark.parametrize('width, height', DEFAULT_SIZES)
def test_boxes_are_tight_inside_and_apart(width, height):
    for seed in range(15):
        scene = render_scene(seed, width, height)
        assert 1 <= len(scene.objects) <= 4
        for obj, mask in zip(scene.objects, scene.masks):
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            rows, cols = np.nonzero(mask)
            # Tight: the box spans exactly the drawn pixels (continuous coordinates).
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x1, y1, x2, y2)
            # Every drawn pixel shows the object's colour; nothing drew over it.
            assert (scene.image[mask] == COLORS[obj.attributes['color']]).all()
            assert obj.attributes['shape'] in SHAPES[obj.label]
            # Big enough to see: at least 15% of the short side.
            assert max(x2 - x1, y2 - y1) >= 0.15 * min(width, height) - 1
        # From the pixels alone: each box's four edge lines show its colour, and no pixel
        # outside the boxes has any object colour.
        outside = np.ones((height, width), dtype=bool)
        for obj in scene.objects:
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            crop = np.all(scene.image[y1:y2, x1:x2] == COLORS[obj.attributes['color']], -1)
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
            outside[y1:y2, x1:x2] = False
        for rgb in COLORS.values():
            assert not np.all(scene.image[outside] == rgb, -1).any()
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                ix = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
                iy = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
                assert ix <= 0 or iy <= 0


def test_colours_are_far_apart_and_far_from_backgrounds():
    rgb = np.array(list(COLORS.values()), dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert distances[~np.eye(len(rgb), dtype=bool)].min() > 100
    for seed in range(20):
        scene = render_scene(seed, 256, 256)
        background = ~np.any(scene.masks, axis=0)
        pixels = scene.image[background].astype(float)
        nearest = np.linalg.norm(pixels[:, None] - rgb[None], axis=-1).min()
        assert nearest > 40


def test_variety_over_many_scenes():
    objects = [o for seed in range(60) for o in generate_scene(seed, 256, 256)[1]]
    assert set(o.label for o in objects) == set(CATEGORIES)
    assert set(o.attributes['color'] for o in objects) == set(COLORS)
    counts = Counter(len(generate_scene(seed, 320, 240)[1]) for seed in range(60))
    assert set(counts) == {1, 2, 3, 4}


def objects_of(images, with_attributes=True):
    return [(Path(i.image_path).name, i.width, i.height,
             [(o.label, tuple(round(v, 3) for v in o.box),
               o.attributes if with_attributes else {}) for o in i.objects])
            for i in sorted(images, key=lambda i: i.image_path)]


@pytest.mark.parametrize('fmt', ['coco', 'yolo', 'labelme'])
def test_written_dataset_reads_back(tmp_path, fmt):
    written = write_dataset(tmp_path / fmt, count=6, seed=3, format=fmt)
    again = load_labels(tmp_path / fmt)  # auto-detects the single format written
    keep_attributes = fmt != 'yolo'  # YOLO has no attributes
    assert objects_of(again, keep_attributes) == objects_of(written, keep_attributes)
    assert {(i.width, i.height) for i in written} <= set(DEFAULT_SIZES)


def test_dataset_bytes_are_deterministic_and_prefix_stable(tmp_path):
    write_dataset(tmp_path / 'a', count=4, seed=9, format=['coco', 'yolo', 'labelme'])
    write_dataset(tmp_path / 'b', count=4, seed=9, format=['coco', 'yolo', 'labelme'])
    write_dataset(tmp_path / 'c', count=2, seed=9, format='coco')
    files_a = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*')
                     if p.is_file())
    assert len(files_a) == 4 * 3 + 3  # png, labelme json, yolo txt; 3 shared files
    for relative in files_a:
        assert (tmp_path / 'a' / relative).read_bytes() == \
            (tmp_path / 'b' / relative).read_bytes(), relative
    for name in ('scene_00000.png', 'scene_00001.png'):
        assert (tmp_path / 'a' / 'images' / name).read_bytes() == \
            (tmp_path / 'c' / 'images' / name).read_bytes()


def test_overwrite_rules(tmp_path):
    write_dataset(tmp_path, count=3, seed=1, format='labelme')
    with pytest.raises(FileExistsError, match='not empty'):
        write_dataset(tmp_path, count=1, seed=1, format='coco')
    (tmp_path / 'notes.txt').write_text('mine')
    write_dataset(tmp_path, count=1, seed=1, format='coco', overwrite=True)
    assert sorted(p.name for p in (tmp_path / 'images').iterdir()) == ['scene_00000.png']
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
    assert len(load_labels(tmp_path)) == 1


def test_overwrite_never_writes_through_a_link(tmp_path):
    out, elsewhere = tmp_path / 'out', tmp_path / 'elsewhere'
    write_dataset(out, count=1, seed=1, format='coco')
    elsewhere.mkdir()
    (elsewhere / 'annotations.json').write_text('precious')
    (out / 'annotations.json').unlink()
    (out / 'annotations.json').symlink_to(elsewhere / 'annotations.json')
    for image in (out / 'images').iterdir():
        image.unlink()
    (out / 'images').rmdir()
    (out / 'images').symlink_to(elsewhere, target_is_directory=True)
    write_dataset(out, count=1, seed=1, format='coco', overwrite=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == ['annotations.json']
    assert (elsewhere / 'annotations.json').read_text() == 'precious'
    assert not (out / 'images').is_symlink() and len(load_labels(out)) == 1


def test_parse_sizes():
    assert parse_sizes('320x240, 256X256') == [(320, 240), (256, 256)]
    with pytest.raises(ValueError, match='WIDTHxHEIGHT'):
        parse_sizes('320-240')


def test_make_scenes_tool(tmp_path, capsys):
    tool = load_tool('make_scenes')
    out = tmp_path / 'scenes'
    args = ['--out', str(out), '--count', '3', '--seed', '5', '--sizes', '256x256',
            '--all-formats']
    assert tool.main(args) == 0
    assert 'wrote 3 images' in capsys.readouterr().out
    for fmt in ('coco', 'yolo', 'labelme'):
        images = load_labels(out, fmt)
        assert len(images) == 3 and all((i.width, i.height) == (256, 256) for i in images)
    assert tool.main(args) == 2
    err = capsys.readouterr().err
    assert '--overwrite' in err and 'overwrite=True' not in err  # the option, not the API
    assert tool.main(args + ['--overwrite']) == 0
    with pytest.raises(SystemExit):
        tool.main(['--out', str(out), '--count', '1', '--sizes', 'big'])
