"""Ground-truth label files (COCO, YOLO, LabelMe) and the per-image prediction JSON.

The package's modules: ``records`` (the records and shared helpers), ``coco``, ``yolo``,
``labelme``, ``predictions`` and ``formats`` (format detection, :func:`load_labels`).

Every reader returns :class:`LabeledImage` records with boxes ``(x1, y1, x2, y2)`` in source
pixels (continuous coordinates: a box covering pixel columns 3..9 is ``x1=3, x2=10``).
Malformed files raise :class:`ValueError` naming the file and the problem.

Layouts understood (``load_labels`` picks one with ``format='auto'``):

* **COCO**: one JSON file with ``images``, ``annotations`` (``bbox = [x, y, w, h]``) and
  ``categories``. An annotation's optional ``attributes`` dict (as CVAT exports it) becomes the
  object's attributes. ``iscrowd=1`` annotations are skipped (crowd regions are not objects).
* **YOLO**: a dataset root holding ``data.yaml`` (``names`` as a list or ``{id: name}``) or
  ``classes.txt``; images under ``images/`` (or the ``train``/``val``/``test`` folders the
  YAML names) and one ``labels/<stem>.txt`` per image (Ultralytics' ``/images/`` ->
  ``/labels/`` rule; a ``.txt`` beside the image also works) with ``class cx cy w h``
  normalised lines. Image sizes are read from the image files. YOLO has no attributes.
* **LabelMe**: one JSON per image (``shapes``, ``imagePath``, ``imageWidth``,
  ``imageHeight``). Only ``rectangle`` shapes are objects; other shape types are skipped.
  Attributes are merged from, in increasing priority: the shape's boolean ``flags`` (a flag
  named ``key=value`` that is true gives ``{key: value}``; any other flag gives
  ``{name: "true"|"false"}``), ``key=value`` pairs in its ``description`` (separated by
  ``,``, ``;`` or new lines; free text is ignored) and an ``attributes`` dict on the shape
  (LabelMe keeps unknown shape keys when it saves). The writer fills ``attributes`` and
  ``description``.

Prediction files (one JSON per image, written by the detect-folder tool and the node's
end-to-end test)::

    {"image": "frame_0001.png", "width": 640, "height": 480,
     "detections": [{"id": "0", "label": "cup", "box": [x1, y1, x2, y2], "score": 0.93,
                     "attributes": {"color": "red"}}]}
"""
from .coco import read_coco, write_coco
from .formats import detect_format, load_labels
from .labelme import read_labelme, read_labelme_file, write_labelme
from .predictions import (PREDICTIONS_DIR, detections_from_json, detections_to_json,
                          load_predictions, predictions_folder, write_prediction_file)
from .records import (FORMATS, IMAGE_EXTENSIONS, LABELME_VERSION, YOLO_CLASS_FILES,
                      YOLO_YAML_NAMES, GroundTruthObject, LabeledImage, image_size)
from .yolo import read_yolo, write_yolo, yolo_label_path

__all__ = ['FORMATS', 'IMAGE_EXTENSIONS', 'LABELME_VERSION', 'PREDICTIONS_DIR',
           'YOLO_CLASS_FILES', 'YOLO_YAML_NAMES', 'GroundTruthObject', 'LabeledImage',
           'detect_format', 'detections_from_json', 'detections_to_json', 'image_size',
           'load_labels', 'load_predictions', 'predictions_folder', 'read_coco',
           'read_labelme', 'read_labelme_file', 'read_yolo', 'write_coco', 'write_labelme',
           'write_prediction_file', 'write_yolo', 'yolo_label_path']
