#!/usr/bin/env python3
"""Watch perception_node work: an image folder or a video plays the camera.

Three ROS 2 nodes run in this process and talk over real DDS: a camera that publishes each
image as sensor_msgs/Image, the perception node (the same class `ros2 run` starts) and a
recorder that saves the annotated images and prints the detections as a table.

    tools/demo.py                      # default model, 8 synthetic scenes as the camera
    tools/demo.py --model /models/qwen3-vl-4b-nf4 --images ~/office_photos \\
        --categories cup chair "potted plant" --out demo_out

The default model (--model default) is the project's tiny one: it knows only the synthetic
scenes' balls, boxes, cones and rings and their colours.

On a robot, start the node with `ros2 launch qwen_vl_perception perception.launch.py` instead.
"""
import argparse
import json
import os
import random
import sys
import threading
import time

from pathlib import Path

from qwen_vl_perception.image_conversion import ImageFormatError, save_rgb
from qwen_vl_perception.data.image_folder import FOLDER_IMAGE_EXTENSIONS, list_images
from qwen_vl_perception.model.default_model import DEFAULT_MODEL_NAME
from qwen_vl_perception.model.loading import ModelLoadError, read_checkpoint_config
from qwen_vl_perception.tool_support import (ToolError, category_names, prepare_output_dir,
                                             run_tool)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='default',
                        help="Qwen3-VL checkpoint directory (default: 'default', the project's "
                             'synthetic-scenes model)')
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--images', help='folder of images (natural order) played as a camera; '
                                         'unreadable files are skipped (default: --scenes '
                                         'synthetic scenes)')
    source.add_argument('--video', help='video file played as a camera')
    parser.add_argument('--scenes', type=int, default=8,
                        help='without --images/--video: how many synthetic scenes to write '
                             'into OUT/camera/images and play (default 8; the same held-out '
                             'scenes every run, ones the default model was not trained on)')
    parser.add_argument('--out', default=None,
                        help='where annotated images go (default demo_out, replaced on each '
                             'run; a folder given here must be empty unless --overwrite)')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
    parser.add_argument('--categories', nargs='+',
                        help="categories (default: the model's training prompt, else the "
                             "node's defaults)")
    parser.add_argument('--attributes', nargs='+', help='attributes asked for')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--quantization', default='auto')
    parser.add_argument('--max-pixels', type=int, default=None)
    parser.add_argument('--min-pixels', type=int, default=None)
    parser.add_argument('--score-threshold', type=float, default=None)
    parser.add_argument('--max-frames', type=int, default=0, help='stop after N frames (0: all)')
    parser.add_argument('--timeout', type=float, default=300.0,
                        help='seconds to wait for one frame\'s detections')
    return parser.parse_args(argv)


def check_inputs(args):
    """Refuse bad options before anything is loaded or written: categories (the node's
    rule), the model folder, the images folder (at least one image) or the video (it opens and
    has a frame)."""
    args.categories = category_names(args.categories)
    if args.model != DEFAULT_MODEL_NAME:
        read_checkpoint_config(args.model)
    if args.images:
        if not list_images(args.images):
            raise ToolError(f'no images ({", ".join(FOLDER_IMAGE_EXTENSIONS)}) in {args.images}')
    elif args.video:
        # FFmpeg's own log lines for an unreadable file would precede the one error line
        # (read by OpenCV when it opens its first video; a user's setting is kept).
        os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')
        import cv2
        if not Path(args.video).is_file():
            raise ToolError(f'video file {args.video} does not exist')
        capture = cv2.VideoCapture(args.video)
        try:
            if not capture.isOpened() or not capture.read()[0]:
                raise ToolError(f'cannot open video {args.video}: not a video OpenCV can '
                                'decode')
        finally:
            capture.release()
    elif args.scenes < 1:
        raise ToolError('--scenes must be at least 1')


def frames_from(args, skipped):
    """(name, rgb) pairs from the folder or the video; unreadable images are reported,
    appended to ``skipped`` and left out (as tools/detect_folder.py does)."""
    from qwen_vl_perception.image_conversion import load_image_file
    if args.images:
        for path in list_images(args.images):
            try:
                rgb = load_image_file(path)
            except (ImageFormatError, OSError) as error:
                skipped.append(path.name)
                print(f'skipped {path.name}: {error}', file=sys.stderr)
                continue
            yield path.stem, rgb
        return
    import cv2
    capture = cv2.VideoCapture(args.video)
    if not capture.isOpened():
        raise ToolError(f'cannot open video {args.video}')
    try:
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            yield f'frame_{index:05d}', cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


def node_overrides(args):
    from rclpy.parameter import Parameter
    values = {'model_path': args.model, 'device': args.device,
              'quantization': args.quantization}
    optional = {'categories': args.categories, 'attributes': args.attributes,
                'max_pixels': args.max_pixels, 'min_pixels': args.min_pixels,
                'score_threshold': args.score_threshold}
    values.update({k: v for k, v in optional.items() if v is not None})
    if args.max_pixels is not None and args.min_pixels is None:
        from qwen_vl_perception.ros.parameters import SPECS
        values['min_pixels'] = min(SPECS['min_pixels'].default, args.max_pixels)
    return [Parameter(name, value=value) for name, value in values.items()]


def run(args) -> int:
    if args.out is None:  # the default folder is the demo's own: rerunning replaces it
        args.out, args.overwrite = 'demo_out', True
    check_inputs(args)
    # The demo's own outputs of an earlier run go, so the folder shows only this run's.
    out = prepare_output_dir(args.out, args.overwrite, inputs=[args.images],
                             stale_patterns=('*_detections.jpg', 'camera'))

    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from vision_msgs.msg import Detection2DArray

    from qwen_vl_perception.ros.messages import image_msg
    from qwen_vl_perception.ros.node import PerceptionNode, StartupError
    from qwen_vl_perception.ros.spinning import Spinner

    if not args.images and not args.video:
        args.images = str(_write_scenes(out / 'camera', args.scenes))
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=random.randint(100, 200))
    perception = peer = spinner = None
    try:
        try:
            perception = PerceptionNode(context=context, parameter_overrides=node_overrides(args))
        except StartupError as error:
            raise ToolError(f'perception node cannot start: {error}') from error
        peer = rclpy.create_node('demo_camera_and_recorder', context=context)
        reliable = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        camera = peer.create_publisher(Image, 'image', reliable)
        results = {}
        arrived = threading.Condition()

        def keep(kind):
            def callback(message):
                with arrived:
                    stamp = message.header.stamp.sec if kind != 'text' else \
                        json.loads(message.data)['stamp']['sec']
                    results.setdefault(stamp, {})[kind] = message
                    arrived.notify_all()
            return callback

        peer.create_subscription(Detection2DArray, 'detections', keep('detections'), reliable)
        peer.create_subscription(Image, 'annotated_image', keep('annotated'), reliable)
        peer.create_subscription(String, 'descriptions', keep('text'), reliable)
        spinner = Spinner(context, perception, peer)  # inference has its own thread
        deadline = time.monotonic() + 30
        while not (camera.get_subscription_count()
                   and perception.count_subscribers('annotated_image')):
            if time.monotonic() > deadline:
                raise ToolError('the camera did not connect to the perception node')
            time.sleep(0.05)

        describe = perception.detector.settings.describe
        rows, skipped, started, count = [], [], time.monotonic(), 0
        for index, (name, rgb) in enumerate(frames_from(args, skipped), start=1):
            if args.max_frames and index > args.max_frames:
                break
            header = _header(index, name)
            camera.publish(image_msg(header, rgb))
            wanted = {'detections', 'annotated'} | ({'text'} if describe else set())
            with arrived:
                if not arrived.wait_for(lambda: wanted <= set(results.get(index, {})),
                                        timeout=args.timeout):
                    raise ToolError(f'no detections for {name} within {args.timeout:.0f} s')
                got = results.pop(index)
            annotated = got['annotated']
            save_rgb(out / f'{name}_detections.jpg', _rgb(annotated))
            attributes = json.loads(got['text'].data)['objects'] if 'text' in got else {}
            detections = got['detections'].detections
            if not detections:
                rows.append((name, None, None, None, None, {}))  # the frame has a row too
            for detection in detections:
                hypothesis = detection.results[0].hypothesis
                extra = {k: v for k, v in attributes.get(detection.id, {}).items()
                         if k not in ('label', 'score')}
                rows.append((name, detection.id, hypothesis.class_id, hypothesis.score,
                             detection.bbox, extra))
            count = index
        _print_table(rows)
        elapsed = time.monotonic() - started
        found = sum(row[1] is not None for row in rows)
        unreadable = f' ({len(skipped)} unreadable images skipped)' if skipped else ''
        print(f'\n{count} frames{unreadable}, {found} detections, '
              f'{elapsed / max(count, 1):.2f} s per frame; annotated images in {out}/')
        if not count:
            raise ToolError(f'no image in {args.images or args.video} could be read')
        return 0
    finally:
        # Stop spinning before the nodes and the context go: a thread still spinning over
        # destroyed handles aborts the process at exit.
        if spinner is not None:
            try:
                spinner.stop()
            except RuntimeError as error:  # a callback hangs: say so, still tear down
                print(f'warning: {error}', file=sys.stderr)
        if perception is not None:
            perception.shutdown()
            perception.destroy_node()
        if peer is not None:
            peer.destroy_node()
        rclpy.try_shutdown(context=context)


def _write_scenes(folder, count):
    """Held-out synthetic scenes (a seed the default model was not trained on)."""
    from qwen_vl_perception.data.scenes import write_dataset
    write_dataset(folder, count, seed=20_000, overwrite=True)
    print(f'camera: {count} synthetic scenes written to {folder}/images')
    return folder / 'images'


def _header(index, name):
    from std_msgs.msg import Header
    header = Header(frame_id='demo_camera')
    header.stamp.sec = index  # the frame number: lets the recorder pair results with frames
    return header


def _rgb(message):
    import numpy as np
    rows = np.frombuffer(bytes(message.data), dtype=np.uint8).reshape(message.height,
                                                                      message.step)
    return rows[:, :message.width * 3].reshape(message.height, message.width, 3)


def _print_table(rows):
    print(f"{'image':<24} {'id':>3} {'label':<16} {'score':>5}  {'box (x1, y1, x2, y2)':<26} "
          'attributes')
    for name, detection_id, label, score, bbox, extra in rows:
        if detection_id is None:
            print(f'{name[:24]:<24} {"-":>3} (no detections)')
            continue
        cx, cy = bbox.center.position.x, bbox.center.position.y
        box = (f'{cx - bbox.size_x / 2:.0f}, {cy - bbox.size_y / 2:.0f}, '
               f'{cx + bbox.size_x / 2:.0f}, {cy + bbox.size_y / 2:.0f}')
        text = ', '.join(f'{k}: {v}' for k, v in extra.items())
        print(f'{name[:24]:<24} {detection_id:>3} {label[:16]:<16} {score:5.2f}  {box:<26} {text}')


def main(argv=None) -> int:
    return run_tool(run, parse_args(argv),
                    expected=(FileNotFoundError, NotADirectoryError, ImageFormatError,
                              ModelLoadError, ValueError))


if __name__ == '__main__':
    sys.exit(main())
