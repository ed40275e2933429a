"""Tests of qwen_vl_perception.data.labels: COCO, YOLO, LabelMe and prediction files."""
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from qwen_vl_perception.detection import Detection
from qwen_vl_perception.data.labels import (GroundTruthObject, LabeledImage, detect_format,
                                            detections_from_json, detections_to_json, load_labels,
                                            load_predictions, write_coco, write_labelme,
                                            write_prediction_file, write_yolo, yolo_label_path)


def write_image(path: Path, width: int, height: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.zeros((height, width, 3), np.uint8))
    return str(path)


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def sample_images(root: Path):
    """Two real image files with objects (boxes exactly representable in YOLO's 6 digits)."""
    return [
        LabeledImage(write_image(root / 'images' / 'a.png', 200, 100), 200, 100, [
            GroundTruthObject('cup', (10.0, 20.0, 60.0, 80.0), {'color': 'red'}),
            GroundTruthObject('table', (0.0, 50.0, 200.0, 100.0), {}),
        ]),
        LabeledImage(write_image(root / 'images' / 'b.jpg', 64, 48), 64, 48, [
            GroundTruthObject('cup', (1.5, 2.0, 33.0, 47.0), {'color': 'blue', 'size': 'big'}),
        ]),
        LabeledImage(write_image(root / 'images' / 'empty.png', 32, 32), 32, 32, []),
    ]


def as_tuples(images, with_attributes=True):
    return sorted(
        (Path(i.image_path).name, i.width, i.height,
         tuple((o.label, tuple(round(v, 3) for v in o.box),
                tuple(sorted(o.attributes.items())) if with_attributes else ())
               for o in i.objects))
        for i in images)


# --------------------------------------------------------------------------------------------
# COCO


def test_coco_read_hand_written(tmp_path):
    path = write_json(tmp_path / 'coco.json', {
        'images': [{'id': 7, 'file_name': 'x.png', 'width': 640, 'height': 480},
                   {'id': 8, 'file_name': 'y.png', 'width': 10, 'height': 10}],
        'annotations': [
            {'id': 1, 'image_id': 7, 'category_id': 3, 'bbox': [10, 20, 30, 40],
             'attributes': {'color': 'red', 'occluded': False, 'count': 2}},
            {'id': 2, 'image_id': 7, 'category_id': 3, 'bbox': [0, 0, 5, 5], 'iscrowd': 1},
        ],
        'categories': [{'id': 3, 'name': 'cup'}],
    })
    images = load_labels(path)
    assert [i.name for i in images] == ['x.png', 'y.png']
    assert images[0].image_path == str(tmp_path / 'x.png')
    (cup,) = images[0].objects  # the crowd annotation is skipped
    assert cup.label == 'cup' and cup.box == (10.0, 20.0, 40.0, 60.0)
    assert cup.attributes == {'color': 'red', 'occluded': 'false', 'count': '2'}
    assert images[1].objects == []


def test_coco_round_trip(tmp_path):
    images = sample_images(tmp_path)
    write_coco(images, tmp_path / 'annotations.json')
    again = load_labels(tmp_path / 'annotations.json', 'coco')
    assert as_tuples(again) == as_tuples(images)
    assert [i.image_path for i in again] == [i.image_path for i in images]
    assert load_labels(tmp_path, 'coco')[0].image_path == images[0].image_path


@pytest.mark.parametrize('change, problem', [
    (lambda d: d.pop('categories'), "'categories'"),
    (lambda d: d['annotations'][0].update(image_id=99), 'unknown image_id 99'),
    (lambda d: d['annotations'][0].update(category_id=5), 'unknown category_id 5'),
    (lambda d: d['annotations'][0].update(bbox=[1, 2, -3, 4]), 'bbox'),
    (lambda d: d['images'][0].pop('width'), "'width'"),
    (lambda d: d['annotations'][0].update(attributes=['red']), 'attributes'),
])
def test_coco_malformed(tmp_path, change, problem):
    data = {'images': [{'id': 1, 'file_name': 'x.png', 'width': 10, 'height': 10}],
            'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 2, 2]}],
            'categories': [{'id': 1, 'name': 'cup'}]}
    change(data)
    path = write_json(tmp_path / 'bad_coco.json', data)
    with pytest.raises(ValueError, match='bad_coco.json') as error:
        load_labels(path, 'coco')
    assert problem in str(error.value)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / 'broken.json'
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match='broken.json.*not valid JSON'):
        load_labels(path)


# --------------------------------------------------------------------------------------------
# YOLO


def test_yolo_round_trip_drops_attributes(tmp_path):
    images = sample_images(tmp_path)
    write_yolo(images, tmp_path)
    assert (tmp_path / 'labels' / 'a.txt').read_text().splitlines()[0] == \
        '0 0.175000 0.500000 0.250000 0.600000'
    assert (tmp_path / 'classes.txt').read_text() == 'cup\ntable\n'
    for source in (tmp_path, tmp_path / 'data.yaml', tmp_path / 'classes.txt'):
        again = load_labels(source)
        assert as_tuples(again, with_attributes=False) == as_tuples(images, False)
        assert all(not o.attributes for i in again for o in i.objects)


def test_yolo_names_mapping_label_beside_image_and_missing_label(tmp_path):
    root = tmp_path / 'ds'
    write_image(root / 'pics' / 'one.png', 100, 50)
    write_image(root / 'pics' / 'two.png', 100, 50)
    (root / 'pics' / 'one.txt').write_text('1 0.5 0.5 0.2 0.4\n\n')
    (root / 'data.yaml').write_text('train: pics\nnames:\n  0: person\n  1: dog\n')
    images = load_labels(root)
    assert [(i.name, i.width, i.height) for i in images] == [('one.png', 100, 50),
                                                             ('two.png', 100, 50)]
    assert images[0].objects[0].label == 'dog'
    assert images[0].objects[0].box == pytest.approx((40.0, 15.0, 60.0, 35.0))
    assert images[1].objects == []


def test_yolo_label_path_rule():
    assert yolo_label_path('/d/images/train/x.jpg') == Path('/d/labels/train/x.txt')
    assert yolo_label_path('/d/images/x.png') == Path('/d/labels/x.txt')
    assert yolo_label_path('/d/pics/x.png') == Path('/d/pics/x.txt')


@pytest.mark.parametrize('line, problem', [
    ('0 0.5 0.5 0.2', 'expected "class cx cy w h"'),
    ('3 0.5 0.5 0.2 0.2', 'class 3 outside 0..1'),
    ('0 0.5 0.5 1.7 0.2', 'normalised'),
    ('cup 0.5 0.5 0.2 0.2', 'not numbers'),
])
def test_yolo_malformed_line(tmp_path, line, problem):
    write_image(tmp_path / 'images' / 'x.png', 20, 20)
    (tmp_path / 'labels').mkdir()
    (tmp_path / 'labels' / 'x.txt').write_text('0 0.5 0.5 0.1 0.1\n' + line + '\n')
    (tmp_path / 'classes.txt').write_text('cup\nplate\n')
    with pytest.raises(ValueError, match=r'x\.txt:2') as error:
        load_labels(tmp_path, 'yolo')
    assert problem in str(error.value)


def test_yolo_problems_with_folder(tmp_path):
    with pytest.raises(ValueError, match='class names'):
        load_labels(tmp_path, 'yolo')
    (tmp_path / 'classes.txt').write_text('cup\n')
    with pytest.raises(ValueError, match='no image files'):
        load_labels(tmp_path, 'yolo')
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / 'x.png').write_bytes(b'not an image')
    with pytest.raises(ValueError, match=r'x\.png.*cannot read image'):
        load_labels(tmp_path, 'yolo')


# --------------------------------------------------------------------------------------------
# LabelMe


def test_labelme_attributes_flags_description_and_shape_types(tmp_path):
    write_image(tmp_path / 'photo.png', 80, 60)
    shapes = [
        {'label': 'cup', 'points': [[30, 40], [10, 5]], 'shape_type': 'rectangle',
         'flags': {'color=green': True, 'size=big': False, 'occluded': True},
         'description': 'material: glass; a note without a pair'},
        {'label': 'cup', 'points': [[0, 0], [5, 5]], 'shape_type': 'rectangle',
         'flags': {}, 'description': 'color=red', 'attributes': {'color': 'blue'}},
        {'label': 'table', 'points': [[0, 0], [5, 0], [5, 5]], 'shape_type': 'polygon'},
    ]
    path = write_json(tmp_path / 'photo.json', {'shapes': shapes, 'imagePath': 'photo.png'})
    (image,) = load_labels(path)
    assert (image.width, image.height) == (80, 60)  # read from the image: no size in JSON
    assert image.image_path == str(tmp_path / 'photo.png')
    first, second = image.objects  # the polygon is not an object
    assert first.box == (10.0, 5.0, 30.0, 40.0)
    assert first.attributes == {'color': 'green', 'occluded': 'true', 'material': 'glass'}
    assert second.attributes == {'color': 'blue'}  # "attributes" wins over "description"


def test_labelme_round_trip_and_folder(tmp_path):
    images = sample_images(tmp_path)
    for image in images:
        write_labelme(image, Path(image.image_path).with_suffix('.json'))
    again = load_labels(tmp_path / 'images')
    assert as_tuples(again) == as_tuples(images)
    data = json.loads((tmp_path / 'images' / 'a.json').read_text())
    assert data['imagePath'] == 'a.png' and data['shapes'][0]['description'] == 'color=red'


@pytest.mark.parametrize('shape, problem', [
    ({'label': 'cup', 'points': [[1, 2]], 'shape_type': 'rectangle'}, '2 [x, y] points'),
    ({'label': '', 'points': [[1, 2], [3, 4]], 'shape_type': 'rectangle'}, 'label'),
    ({'label': 'cup', 'points': [[1, 2], [3, 4]], 'shape_type': 'rectangle', 'flags': [1]},
     'flags'),
])
def test_labelme_malformed(tmp_path, shape, problem):
    path = write_json(tmp_path / 'bad.json', {'shapes': [shape], 'imagePath': 'bad.png',
                                              'imageWidth': 10, 'imageHeight': 10})
    with pytest.raises(ValueError, match=r'bad\.json: shapes\[0\]') as error:
        load_labels(path, 'labelme')
    assert problem in str(error.value)


# --------------------------------------------------------------------------------------------
# Auto-detection


def test_detect_format(tmp_path):
    images = sample_images(tmp_path)
    write_coco(images, tmp_path / 'annotations.json')
    assert detect_format(tmp_path / 'annotations.json') == 'coco'
    assert detect_format(tmp_path) == 'coco'
    write_yolo(images, tmp_path)
    with pytest.raises(ValueError, match='several label formats.*coco.*yolo'):
        load_labels(tmp_path)
    assert detect_format(tmp_path / 'data.yaml') == 'yolo'
    write_labelme(images[0], tmp_path / 'images' / 'a.json')
    assert detect_format(tmp_path / 'images' / 'a.json') == 'labelme'
    assert detect_format(tmp_path / 'images') == 'labelme'
    with pytest.raises(ValueError, match='cannot tell the label format'):
        detect_format(tmp_path / 'images' / 'a.png')
    with pytest.raises(ValueError, match='not found'):
        load_labels(tmp_path / 'missing')
    with pytest.raises(ValueError, match='unknown label format'):
        load_labels(tmp_path, 'voc')
    other = write_json(tmp_path / 'other' / 'x.json', {'hello': 1})
    with pytest.raises(ValueError, match='neither COCO'):
        load_labels(other)


# --------------------------------------------------------------------------------------------
# Prediction files


def test_prediction_json_round_trip(tmp_path):
    detections = [Detection('cup', (1.0, 2.0, 30.5, 40.0), 0.93, {'color': 'red'}, id='0'),
                  Detection('plate', (0.0, 0.0, 5.0, 5.0), 0.5, {}, id='1')]
    data = detections_to_json('frame.png', 640, 480, detections)
    assert data['detections'][0] == {'id': '0', 'label': 'cup', 'box': [1.0, 2.0, 30.5, 40.0],
                                     'score': 0.93, 'attributes': {'color': 'red'}}
    assert detections_from_json(json.loads(json.dumps(data))) == ('frame.png', 640, 480,
                                                                  detections)
    write_prediction_file(tmp_path / 'p' / 'frame.json', 'dir/frame.png', 640, 480, detections)
    write_json(tmp_path / 'p' / 'summary.json', {'images': 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        loaded = load_predictions(tmp_path / 'p')
    assert loaded == {'frame.png': detections}
    assert 'summary.json' in str(caught[0].message)
    write_prediction_file(tmp_path / 'p' / 'frame2.json', 'frame.png', 640, 480, [])
    with pytest.raises(ValueError, match='frame2.json.*already read'):
        load_predictions(tmp_path / 'p')


@pytest.mark.parametrize('change, problem', [
    (lambda d: d.pop('width'), "missing key 'width'"),
    (lambda d: d.update(height=0), 'height must be a positive integer'),
    (lambda d: d['detections'][0].update(box=[5, 5, 1, 1]), 'x2 < x1'),
    (lambda d: d['detections'][0].update(box=[1, 2, 3]), '4 numbers'),
    (lambda d: d['detections'][0].update(score='high'), 'score'),
    (lambda d: d['detections'][0].pop('label'), "detection 0: missing key 'label'"),
])
def test_prediction_json_malformed(change, problem):
    data = detections_to_json('x.png', 10, 10, [Detection('cup', (1, 1, 2, 2), 0.5)])
    change(data)
    with pytest.raises(ValueError, match='pred.json') as error:
        detections_from_json(data, 'pred.json')
    assert problem in str(error.value)
