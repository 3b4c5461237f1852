"""Speed of ``-demo`` on a 640x480 video with the quick-start model, against a 30 fps target.

    python bench/bench_demo.py [--frames 120] [--loadModel CKPT] [--threads N] [--keep DIR]

Writes a 640x480 mp4v test video of synthetic people (``datasets.synthetic``'s renderer) sliding
across a cluttered frame, then, without ``--loadModel``, makes a checkpoint of the quick-start
model (``conf/models/hourglass_quick.defconf``: 2 stacks, 96 channels, 128x128 input, bfloat16
autocast, flip test, DARK) by one ``main.py`` epoch of 16 synthetic people (the weights do not
matter for speed), and times ``main.py -demo video.mp4`` with the whole image as the person box:
reading, cropping, the model, decoding, drawing and writing the mp4 and keypoints.json. Prints
the loop's frames per second (what ``-demo`` reports), the end-to-end rate including loading the
checkpoint, and their ratio to 30 fps.
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import main as main_module  # noqa: E402
from datasets.synthetic import record_seed, render  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_FPS = 30.0
SIZE = (640, 480)          # (W, H)


def write_video(path, frames, fps=30.0, people_every=30):
    """A (W, H) = 640x480 mp4v video: a new synthetic person every ``people_every`` frames, each
    sliding left to right over its own rendered background."""
    w, h = SIZE
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), fps, SIZE)
    if not writer.isOpened():
        raise SystemExit(f'cannot write {path}: OpenCV has no mp4v encoder')
    person = None
    for i in range(frames):
        if i % people_every == 0:
            person = cv2.cvtColor(render(record_seed(0, 'val', i // people_every), h), cv2.COLOR_RGB2BGR)
        canvas = np.zeros((h, w, 3), np.uint8)
        x = int((w - h) * (i % people_every) / max(people_every - 1, 1))
        canvas[:, x:x + h] = person
        writer.write(canvas)
    writer.release()
    return path


def quick_checkpoint(folder):
    """The quick-start model after one epoch of 16 synthetic people (its training prints silenced)."""
    argv = ['-DataConfig', os.path.join(ROOT, 'conf/datasets/synthetic.defconf'),
            '-ModelConfig', os.path.join(ROOT, 'conf/models/hourglass_quick.defconf'),
            '--nEpochs', '1', '--LRSteps', '1', '--nTrainSamples', '16', '--nValSamples', '8', '--visCount', '0',
            '--progress', 'false', '--expDir', folder, '--expID', 'quick', '--overwrite']
    with contextlib.redirect_stdout(io.StringIO()):
        main_module.main(argv)
    return os.path.join(folder, 'quick', 'model_last.pth')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--frames', type=int, default=120, help='frames of the test video')
    p.add_argument('--loadModel', default=None, help='checkpoint to time (default: the quick-start model)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: PyTorch\'s default)')
    p.add_argument('--keep', default=None, metavar='DIR', help='keep the video and the demo output here')
    p.add_argument('--demoArgs', default='', help='more -demo options, e.g. "--flipTest false --amp false"')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        video = write_video(os.path.join(folder, 'bench.mp4'), args.frames)
        ckpt = args.loadModel or quick_checkpoint(folder)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            out = main_module.main(['-demo', video, '--loadModel', ckpt, '--out', os.path.join(folder, 'demo'),
                                    '--progress', 'false', *args.demoArgs.split()])
        total = time.perf_counter() - start
    print(f'-demo on a {SIZE[0]}x{SIZE[1]} video, {out["frames"]} frames, {os.path.basename(ckpt)}, '
          f'{torch.get_num_threads()} torch threads, {len(out["results"])} people')
    print(f'  loop (read, crop, model, decode, draw, write): {out["fps"]:.1f} fps, {out["fps"] / TARGET_FPS:.2f}x '
          f'the {TARGET_FPS:.0f} fps target')
    print(f'  end to end (with loading the checkpoint):       {out["frames"] / total:.1f} fps, '
          f'{out["frames"] / total / TARGET_FPS:.2f}x')
    return out


if __name__ == '__main__':
    main()
