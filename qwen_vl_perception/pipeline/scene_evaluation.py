"""A scratch-trained checkpoint's figures on held-out synthetic scenes, through the node's own
Engine + Detector path, and how far two checkpoints' detections agree."""
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

from ..data.evaluation import evaluate
from ..data.labels import GroundTruthObject, LabeledImage
from ..data.scenes import CATEGORIES, DEFAULT_SIZES
from ..detection import Detection
from ..detector import DetectionSettings, Detector
from .scratch_training import ATTRIBUTES, ScratchTrainingConfig, make_scene

PathLike = Union[str, Path]


def evaluate_on_scenes(checkpoint: PathLike, count: int = 40, seed: int = 10_000,
                       min_objects: int = 1, max_objects: int = 4,
                       sizes: Sequence[Tuple[int, int]] = DEFAULT_SIZES,
                       device: str = 'cpu', quantization: str = 'none',
                       compute_dtype: str = 'float32', max_new_tokens: int = 200,
                       batch_size: int = 8) -> Tuple[Dict[str, object], List[str], list]:
    """Detect on ``count`` held-out scenes through the node's Engine + Detector path and score
    with :func:`~qwen_vl_perception.data.evaluation.evaluate`. Returns (figures, raw answers,
    per-scene :class:`~qwen_vl_perception.data.labels.LabeledImage` of the detections)."""
    from ..model.engine import VisionLanguageEngine
    engine = VisionLanguageEngine(checkpoint, device=device, quantization=quantization,
                                  compute_dtype=compute_dtype)
    settings = DetectionSettings(categories=CATEGORIES, describe=True, attributes=ATTRIBUTES,
                                 max_new_tokens=max_new_tokens)
    detector = Detector(engine, settings)
    config = ScratchTrainingConfig(min_objects=min_objects, max_objects=max_objects,
                                   sizes=tuple(sizes))
    scenes = [make_scene(config, seed, index) for index in range(count)]
    truth, predictions, answers = [], {}, []
    started = time.perf_counter()
    try:
        for start in range(0, count, batch_size):
            chunk = scenes[start:start + batch_size]
            for offset, (scene, frame) in enumerate(
                    zip(chunk, detector.detect([s.image for s in chunk]))):
                name = f'scene_{start + offset:05d}.png'
                height, width = scene.image.shape[:2]
                truth.append(LabeledImage(name, width, height, scene.objects))
                predictions[name] = frame.detections
                answers.append(frame.raw_text)
    finally:
        engine.close()
    report = evaluate(truth, predictions, categories=CATEGORIES)
    color = report.attributes.get('color')
    figures = {'precision': report.precision, 'recall': report.recall,
               'color_accuracy': color.accuracy if color else None,
               'images': count, 'objects': sum(len(t.objects) for t in truth),
               'seconds': round(time.perf_counter() - started, 1)}
    detected = [LabeledImage(t.image_path, t.width, t.height,
                             [GroundTruthObject(d.label, d.box, dict(d.attributes))
                              for d in predictions[t.image_path]]) for t in truth]
    return figures, answers, detected


def detection_agreement(reference: Sequence, other: Sequence) -> Dict[str, object]:
    """How far two models' detections on the same scenes agree: ``other`` scored with
    ``reference``'s detections as the ground truth (precision, recall at IoU 0.5, colour
    agreement on matched objects). Both are lists from :func:`evaluate_on_scenes`."""
    predictions = {image.image_path: [Detection(o.label, o.box, 1.0, dict(o.attributes))
                                      for o in image.objects] for image in other}
    report = evaluate(list(reference), predictions, categories=CATEGORIES)
    color = report.attributes.get('color')
    return {'precision': report.precision, 'recall': report.recall,
            'color_agreement': color.accuracy if color else None}
