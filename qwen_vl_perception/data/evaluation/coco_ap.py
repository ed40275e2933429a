"""COCO AP per category through pycocotools' ``COCOeval`` (imported on first use):
101-point interpolated, every prediction whatever its score, IoU 0.50:0.05:0.95."""
import contextlib
import io
from typing import Dict, List, Tuple

import numpy as np

from qwen_vl_perception.data.labels import LabeledImage
from qwen_vl_perception.detection import Detection

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def coco_ap(images: List[LabeledImage], predictions: Dict[str, List[Detection]],
            names: List[str]) -> Dict[str, Tuple[float, float, List[float]]]:
    """``{category: (ap50, ap, precision at the 101 recall points for IoU 0.5)}``.

    Only categories with ground truth appear. Categories with ground truth but no
    predictions get zeros.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    category_ids = {name: index + 1 for index, name in enumerate(names)}
    gt_images, gt_annotations, results = [], [], []
    max_per_image = 1
    for image_id, image in enumerate(images, start=1):
        gt_images.append({'id': image_id, 'file_name': image.name,
                          'width': image.width, 'height': image.height})
        for obj in image.objects:
            x1, y1, x2, y2 = obj.box
            gt_annotations.append({
                'id': len(gt_annotations) + 1, 'image_id': image_id,
                'category_id': category_ids[obj.label], 'bbox': [x1, y1, x2 - x1, y2 - y1],
                'area': (x2 - x1) * (y2 - y1), 'iscrowd': 0})
        detections = predictions.get(image.name, [])
        max_per_image = max(max_per_image, len(detections))
        for det in detections:
            x1, y1, x2, y2 = det.box
            results.append({'image_id': image_id, 'category_id': category_ids[det.label],
                            'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(det.score)})
    with_gt = sorted({category_ids[a] for a in [o.label for i in images for o in i.objects]})
    id_to_name = {cid: name for name, cid in category_ids.items()}
    zeros = [0.0] * len(RECALL_POINTS)
    if not results:
        return {id_to_name[cid]: (0.0, 0.0, list(zeros)) for cid in with_gt}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        coco_gt = COCO()
        coco_gt.dataset = {'images': gt_images, 'annotations': gt_annotations,
                           'categories': [{'id': cid, 'name': name}
                                          for name, cid in category_ids.items()]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType='bbox')
        evaluator.params.catIds = list(category_ids.values())
        evaluator.params.iouThrs = COCO_IOU_THRESHOLDS.copy()
        evaluator.params.areaRng = [[0.0, 1e10]]
        evaluator.params.areaRngLbl = ['all']
        evaluator.params.maxDets = [max(100, max_per_image)]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval['precision']  # [iou, recall, category, area, max dets]
    result = {}
    for k, cid in enumerate(evaluator.params.catIds):
        if cid not in with_gt:
            continue
        curves = np.clip(precision[:, :, k, 0, -1], 0.0, None)  # -1 means no GT; not here
        per_iou = curves.mean(axis=1)
        result[id_to_name[cid]] = (float(per_iou[0]), float(per_iou.mean()),
                                   [float(v) for v in curves[0]])
    return result
