"""3D from registered depth (qwen_vl_perception.depth) and depth-to-colour pairing by stamp
(qwen_vl_perception.stamp_pairing), on synthetic scenes with known depth."""
import gc
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from qwen_vl_perception.depth import (DepthFormatError, Intrinsics, box_depth,
                                      depth_msg_to_meters, locate)
from qwen_vl_perception.detection import Detection
from qwen_vl_perception.data.scenes import (CATEGORIES, camera_matrix,
                                            depth_to_millimetres, render_depth, render_scene)
from qwen_vl_perception.stamp_pairing import NearestStamp


def _message(array, encoding, bigendian=False, pad=0):
    height, width = array.shape
    dtype = array.dtype.newbyteorder('>' if bigendian else '<')
    rows = np.ascontiguousarray(array.astype(dtype)).view(np.uint8).reshape(height, -1)
    data = np.concatenate([rows, np.zeros((height, pad), np.uint8)], axis=1).tobytes()
    return SimpleNamespace(height=height, width=width, encoding=encoding, step=rows.shape[1] + pad,
                           is_bigendian=int(bigendian), data=data)


def _scenes(count, noise=0.0, holes=0.0, seed=7):
    """(scene, depth scene) pairs of 320x240 scenes with 1-4 objects at 1-5 m."""
    pairs = []
    for index in range(count):
        scene = render_scene(np.random.default_rng([seed, index]), 320, 240)
        depth = render_depth(scene, np.random.default_rng([seed, index, 1]), near=1.0,
                             far=5.0, noise=noise, holes=holes)
        pairs.append((scene, depth))
    return pairs


def _detections(scene):
    return [Detection(label=obj.label, box=obj.box, score=1.0, id=str(index))
            for index, obj in enumerate(scene.objects)]


def _relative_errors(pairs, transport=None):
    errors, categories = [], set()
    for scene, depth in pairs:
        depth_m = depth.depth_m if transport is None else transport(depth.depth_m)
        height, width = depth_m.shape
        intrinsics = Intrinsics.from_k(depth.camera_k, width, height)
        located, missing = locate(_detections(scene), depth_m, intrinsics)
        assert missing == 0 and len(located) == len(scene.objects)
        for item in located:
            truth = np.array(depth.positions[int(item.detection.id)])
            errors.append(np.linalg.norm(np.array(item.position) - truth) / np.linalg.norm(truth))
            categories.add(item.detection.label)
    return np.array(errors), categories


def test_depth_messages_in_millimetres_and_metres():
    millimetres = np.array([[0, 1000, 65535], [1500, 0, 2]], np.uint16)
    for bigendian, pad in ((False, 0), (True, 3)):
        meters = depth_msg_to_meters(_message(millimetres, '16UC1', bigendian, pad))
        assert meters.dtype == np.float32 and meters.shape == (2, 3)
        np.testing.assert_allclose(meters[~np.isnan(meters)], [1.0, 65.535, 1.5, 0.002],
                                   rtol=1e-6)
        assert np.isnan(meters[0, 0]) and np.isnan(meters[1, 1])
    floats = np.array([[1.25, np.nan, np.inf], [-1.0, 0.0, 4.5]], np.float32)
    meters = depth_msg_to_meters(_message(floats, '32FC1'))
    assert meters[0, 0] == 1.25 and meters[1, 2] == 4.5
    assert np.isnan(meters).sum() == 4  # NaN, inf, negative and 0: no reading


@pytest.mark.parametrize('change, message', [
    ({'encoding': 'rgb8'}, "depth encoding 'rgb8'"),
    ({'step': 2}, 'smaller than width'),
    ({'data': b'\0' * 5}, 'expected height 2 x step 6'),
    ({'width': 0}, 'width must be a positive integer'),
])
def test_bad_depth_messages_say_what_is_wrong(change, message):
    good = _message(np.ones((2, 3), np.uint16), '16UC1')
    with pytest.raises(DepthFormatError, match=message):
        depth_msg_to_meters(SimpleNamespace(**{**vars(good), **change}))


def test_positions_are_within_two_percent_at_one_to_five_metres():
    """Every object of 60 scenes (all four shapes, rings showing the wall through their hole),
    with 1% depth noise and 10% of the pixels without a reading."""
    errors, categories = _relative_errors(_scenes(60, noise=0.01, holes=0.1))
    assert categories == set(CATEGORIES)
    assert len(errors) > 100
    assert errors.max() < 0.02, np.sort(errors)[-5:]
    clean, _ = _relative_errors(_scenes(20))
    assert clean.max() < 0.002  # without noise only the wall's slope and rounding remain


def test_16uc1_zero_holes_give_the_same_positions():
    pairs = _scenes(20, noise=0.01, holes=0.1)
    errors, _ = _relative_errors(
        pairs, transport=lambda m: depth_msg_to_meters(_message(depth_to_millimetres(m),
                                                                '16UC1')))
    assert errors.max() < 0.02


def test_an_object_without_valid_depth_is_left_out_and_counted():
    scene, depth = next(pair for pair in _scenes(20) if len(pair[0].objects) >= 2)
    depth_m = depth.depth_m.copy()
    x1, y1, x2, y2 = (int(v) for v in scene.objects[0].box)
    depth_m[y1:y2, x1:x2] = np.nan  # a reflective object: no reading anywhere on it
    intrinsics = Intrinsics.from_k(depth.camera_k, 320, 240)
    located, missing = locate(_detections(scene), depth_m, intrinsics)
    assert missing == 1
    assert [item.detection.id for item in located] == [str(i)
                                                       for i in range(1, len(scene.objects))]
    assert box_depth(depth_m, scene.objects[0].box) is None


def test_size_is_the_box_at_its_depth():
    depth_m = np.full((240, 320), 2.0, np.float32)
    k = camera_matrix(320, 240, horizontal_fov_deg=90.0)  # fx = 160
    (item,), _ = locate([Detection('box', (100.0, 60.0, 180.0, 100.0), 1.0)], depth_m,
                        Intrinsics.from_k(k, 320, 240))
    assert item.size == pytest.approx((1.0, 0.5, 0.5))
    assert item.position == pytest.approx(((139.5 - 159.5) * 2 / 160, (79.5 - 119.5) * 2 / 160,
                                           2.0))


def test_unregistered_depth_and_bad_intrinsics_are_refused():
    with pytest.raises(DepthFormatError, match='not registered to the colour image'):
        locate([], np.ones((120, 160), np.float32),
               Intrinsics.from_k(camera_matrix(320, 240), 320, 240))
    with pytest.raises(DepthFormatError, match='positive focal lengths'):
        Intrinsics.from_k([0.0] * 9, 320, 240)
    with pytest.raises(DepthFormatError, match='9 entries'):
        Intrinsics.from_k([1.0] * 4, 320, 240)


def test_nearest_stamp_within_the_skew_wins_including_later_arrivals():
    pairing = NearestStamp(max_skew_s=0.05)
    pairing.add(10.00, 'early')
    pairing.add(10.07, 'too far')
    request = pairing.request(10.03)
    assert request.best == 'early'
    pairing.add(10.04, 'nearest, came after the colour frame')
    assert pairing.resolve(request) == 'nearest, came after the colour frame'
    assert pairing.resolve(pairing.request(11.0)) is None  # nothing within 50 ms


def test_old_depth_frames_and_dropped_requests_are_not_kept():
    pairing = NearestStamp(max_skew_s=0.05, keep_s=1.0)
    pairing.add(1.0, 'old')
    pairing.add(2.5, 'new')
    assert pairing.resolve(pairing.request(1.0)) is None  # evicted: older than 1 s
    request = pairing.request(2.5)
    assert pairing.pending == 1
    del request  # its colour frame was dropped unprocessed
    gc.collect()
    assert pairing.pending == 0


def test_resolve_waits_only_while_a_match_may_still_come():
    pairing = NearestStamp(max_skew_s=0.05)
    request = pairing.request(5.0)
    threading.Timer(0.2, pairing.add, args=(5.01, 'late depth')).start()
    assert pairing.resolve(request, wait_s=60.0) == 'late depth'
    pairing.add(7.0, 'much newer')  # now no depth for 6.0 can come any more
    started = time.monotonic()
    assert pairing.resolve(pairing.request(6.0), wait_s=60.0) is None
    assert time.monotonic() - started < 30.0  # returned at once, not after the wait
