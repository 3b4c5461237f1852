"""``-demo PATH``: a trained checkpoint on an image, a folder of images, a video file or a camera.

    python main.py -demo photo.jpg --loadModel exp/quickstart/model_best.pth
    python main.py -demo images/ --loadModel coco_hrnet.pth --detFile detections.json
    python main.py -demo clip.mp4 --loadModel coco_hrnet.pth --personModel higherhrnet.pth
    python main.py -demo cam:0 --loadModel exp/quickstart/model_best.pth      (Ctrl-C stops)

People (``utils.predictor.Predictor.infer``):

* a bottom-up checkpoint (HigherHRNet) finds every person of the whole image itself;
* a top-down checkpoint takes one crop per person box, the boxes from
  - ``--detFile``: a COCO detections json list ``{image_id, category_id, bbox [x, y, w, h], score}``
    (category 1, score >= ``--detThreshold``); an entry with ``file_name`` belongs to the image of
    that file name, else its ``image_id`` is matched to the image's COCO id, ``int(file stem)``
    (``000000000785.jpg`` is 785), or, for a video or camera, to the 0-based frame index; an image
    with no detection has no people (a ``--detFile`` the checkpoint recorded, the detections it
    was validated with, is not used);
  - ``--personModel CKPT``: a bottom-up checkpoint; the extents of its people's keypoints (people
    scoring >= ``--detThreshold``), padded by 1.25 as COCO boxes are, become the boxes;
  - neither: the whole image is one person.

Output, in ``--out DIR`` (default: the checkpoint's folder/demo): the drawn images under their own
names, or ``<video stem>.mp4`` (``cam<N>.mp4`` for a camera) at the source's frame rate and size
(mp4v), skeletons drawn as in vis.png (left limbs blue, right orange, centre green), keypoints
scoring below ``--kptThreshold`` hidden; ``--heatmaps`` adds beside each drawing a grid of the K
predicted heatmaps (and, for bottom-up models, a grid of the K tag maps) mapped back onto the
image, so the frame is wider. And ``keypoints.json``, in COCO's results layout: one entry per
person ``{image_id, category_id 1, keypoints [x, y, score] x K flat (original pixels), score (the
mean joint score), box [x, y, w, h]}`` (images also carry ``file_name``); image_id is the COCO
id of a numeric file name, else the image's 0-based index in the sorted folder; the frame index
for a video.

Folders and videos show a progress bar with images or frames per second (``--progress``, which
a checkpoint records: ``--progress true`` when it was trained without). A folder's unreadable
image is one warning line on stderr and is skipped; a path that does not
exist, an unreadable video or a camera that cannot be opened is one ``PoseError`` line.
"""
import contextlib
import math
import os
import sys
import time

import cv2
import numpy as np

from datasets.base import MIN_BOX_SIDE
from datasets.formats import load_json
from utils import checkpoint
from utils.errors import ConfigError, DatasetError
from utils.io import atomic_write, write_json
from utils.predictor import Predictor, options_namespace, pick_device
from vis.draw import SIDE_COLOURS, draw_skeleton

# frames (or images of a folder) whose crops go through the model together; a camera runs one at
# a time, for latency
FRAME_BATCH = 8
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
BGR_COLOURS = {side: tuple(reversed(c)) for side, c in SIDE_COLOURS.items()}


# ----------------------------------------------------------------------------- sources

class Frame:
    """One image of a source: ``image`` uint8 BGR (H, W, 3), or None when unreadable."""

    def __init__(self, index, image_id, name, image, path=None):
        self.index, self.image_id, self.name, self.image, self.path = index, image_id, name, image, path


@contextlib.contextmanager
def _quiet_opencv():
    """OpenCV's and FFmpeg's own warnings off while a capture opens: its failure is our one line."""
    level = cv2.utils.logging.getLogLevel()
    before = os.environ.get('OPENCV_FFMPEG_LOGLEVEL')
    os.environ['OPENCV_FFMPEG_LOGLEVEL'] = '-8'
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)
        if before is None:
            os.environ.pop('OPENCV_FFMPEG_LOGLEVEL', None)
        else:
            os.environ['OPENCV_FFMPEG_LOGLEVEL'] = before


def image_id_of(path, index):
    """The COCO id of a numeric file name (``000000000785.jpg`` -> 785), else ``index``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else index


def read_image(path):
    """uint8 BGR (H, W, 3) as the readers read it (the stored pixels, EXIF orientation ignored), or
    None when the file is not a readable image."""
    return cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)


class ImageSource:
    """One image or the images of a folder (sorted by name)."""
    kind, unit, live = 'images', 'image', False

    def __init__(self, paths, folder=None):
        self.paths, self.folder = paths, folder
        self.total, self.fps = len(paths), None

    def __iter__(self):
        for i, path in enumerate(self.paths):
            yield Frame(i, image_id_of(path, i), os.path.basename(path), read_image(path), path)

    def close(self):
        pass


class VideoSource:
    """A video file or a camera (``cv2.VideoCapture``, ``live``), frame by frame."""
    kind, unit = 'video', 'frame'

    def __init__(self, capture, name, first, live=False):
        self.capture, self.name, self.first, self.live = capture, name, first, live
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if math.isfinite(fps) and fps > 0 else 30.0
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.total = count if count > 0 else None

    def __iter__(self):
        frame, i = self.first, 0
        while frame is not None:
            yield Frame(i, i, f'{self.name} frame {i}', frame)
            ok, frame = self.capture.read()
            frame, i = frame if ok else None, i + 1

    def close(self):
        self.capture.release()


def open_source(path):
    """'cam:N', a video file, an image file or a folder of images -> its source. A path that does not
    exist, an empty folder, an unreadable image, video or camera is one ``DatasetError``."""
    if path.startswith('cam:'):
        try:
            n = int(path[4:])
        except ValueError:
            raise ConfigError(f"-demo {path}: a camera is 'cam:N' with N its index (cam:0)") from None
        with _quiet_opencv():
            capture = cv2.VideoCapture(n)
            ok, first = capture.read() if capture.isOpened() else (False, None)
        if not ok:
            capture.release()
            raise DatasetError(f'-demo {path}: cannot open camera {n} (no such device, or it is busy)')
        return VideoSource(capture, f'cam{n}', first, live=True)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(path, n)))
        if not names:
            raise DatasetError(f'-demo {path}: no images in the folder ({", ".join(IMAGE_EXTENSIONS)})')
        return ImageSource([os.path.join(path, n) for n in names], folder=path)
    if not os.path.isfile(path):
        raise DatasetError(f'-demo {path}: no such file or folder')
    if path.lower().endswith(IMAGE_EXTENSIONS):
        if read_image(path) is None:
            raise DatasetError(f'-demo {path}: corrupt or unreadable image')
        return ImageSource([path])
    with _quiet_opencv():
        capture = cv2.VideoCapture(path)
        ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise DatasetError(f'-demo {path}: cannot read the video (not a video, or a format OpenCV cannot decode)')
    return VideoSource(capture, os.path.splitext(os.path.basename(path))[0], first)


# ----------------------------------------------------------------------------- person boxes

class Detections:
    """A COCO detections json -> boxes (M, 4) x, y, w, h per image (see the module docstring)."""

    def __init__(self, path, threshold=0.0):
        if not os.path.isfile(path):
            raise ConfigError(f'--detFile {path}: no such file')
        dets = load_json(path, 'detections')
        if not isinstance(dets, list):
            raise DatasetError(f'{path}: expected a json list of detections {{image_id or file_name, '
                               f'category_id, bbox, score}}, found {type(dets).__name__}')
        self.by_id, self.by_name = {}, {}
        for n, d in enumerate(dets):
            try:
                if d.get('category_id', 1) != 1 or float(d.get('score', 1.0)) < threshold:
                    continue
                box = [float(v) for v in d['bbox']]
                key = ('name', os.path.basename(d['file_name'])) if 'file_name' in d else ('id', int(d['image_id']))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise DatasetError(f'{path}: detection {n}: needs image_id or file_name, and bbox (4 numbers) '
                                   f'({type(exc).__name__}: {exc})') from None
            if len(box) != 4 or not all(math.isfinite(v) for v in box):
                raise DatasetError(f'{path}: detection {n}: bbox must be 4 finite numbers x, y, w, h')
            if box[2] > 0 and box[3] > 0:
                (self.by_name if key[0] == 'name' else self.by_id).setdefault(key[1], []).append(box)

    def boxes(self, frame):
        found = self.by_name.get(frame.name, []) if frame.path else []
        found = found + self.by_id.get(frame.image_id, [])
        return np.array(found, np.float64).reshape(-1, 4)


class PersonModel:
    """A bottom-up predictor whose people's keypoint extents are the boxes (at least
    ``MIN_BOX_SIDE`` pixels a side, around the extent's centre)."""

    def __init__(self, predictor, threshold=0.0):
        self.predictor, self.threshold = predictor, threshold

    def boxes(self, frame):
        people = self.predictor(frame.image, bgr=True)
        boxes = [p['box'] for p in people if p['score'] >= self.threshold]
        boxes = np.array(boxes, np.float64).reshape(-1, 4)
        grow = np.maximum(MIN_BOX_SIDE - boxes[:, 2:], 0.0)
        boxes[:, :2] -= grow / 2
        boxes[:, 2:] += grow
        return boxes


class WholeImage:
    def boxes(self, frame):
        return None


def given_det_file(opts, ckpt):
    """``--detFile`` as given on the command line or in a config file (``main.resolve`` leaves out
    the one a checkpoint recorded: the detections it was validated with say nothing about the
    demo's images)."""
    return opts.detFile


def person_boxes(opts, predictor, device):
    """Where a top-down predictor's boxes come from (``--detFile``, ``--personModel`` or the whole
    image); None for a bottom-up predictor, which needs none."""
    if predictor.bottom_up:
        for option in ('detFile', 'personModel'):
            if getattr(opts, option, None):
                print(f'warning: --{option} is not used: the bottom-up model {opts.model} finds the people itself',
                      file=sys.stderr)
        return None
    if opts.detFile and opts.personModel:
        raise ConfigError('--detFile and --personModel both give person boxes: choose one')
    if opts.detFile:
        return Detections(opts.detFile, opts.detThreshold)
    if opts.personModel:
        people = Predictor.from_checkpoint(opts.personModel, device)
        if not people.bottom_up:
            raise ConfigError(f'--personModel {opts.personModel}: {people.opts.model} is a top-down model; '
                              f'a bottom-up checkpoint (HigherHRNet) finds the people')
        return PersonModel(people, opts.detThreshold)
    return WholeImage()


# ----------------------------------------------------------------------------- drawing

def draw_people(image, people, joint_set, threshold):
    """The people (``Predictor.infer``'s) drawn on a copy of a BGR image; joints scoring below
    ``threshold`` (and the limbs touching them) hidden. Line width follows the image size."""
    thickness = max(2, int(round(max(image.shape[:2]) / 320)))
    out = image
    for person in people:
        kp = person['keypoints']
        out = draw_skeleton(out, kp[:, :2], kp[:, 2] >= threshold, joint_set, thickness=thickness,
                            radius=thickness + 1, colours=BGR_COLOURS)
    return out if people else image.copy()


def _tile_maps(entries, key, k, tile):
    """Per-crop maps (K, h, w) with their original -> map affines -> (K, th, tw) in tile pixels:
    each crop's maps warped back onto the image (scaled to the tile), the maximum over crops."""
    tw, th, fx, fy = tile
    out = np.zeros((k, th, tw), np.float32)
    for entry in entries:
        if entry is None or entry.get(key) is None:
            continue
        a = np.asarray(entry['affine'], np.float64)
        to_map = np.concatenate([a[:, :2] @ np.diag([1.0 / fx, 1.0 / fy]), a[:, 2:]], axis=1)
        for j, m in enumerate(entry[key]):
            warped = cv2.warpAffine(np.ascontiguousarray(m, np.float32), to_map, (tw, th),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=0)
            if key == 'heatmaps':
                np.maximum(out[j], warped, out=out[j])
            else:                               # tags: one whole-image entry (bottom-up)
                out[j] = warped
    return out


def map_panel(image, entries, names, key='heatmaps'):
    """A grid of the K maps (``key``: 'heatmaps' in [0, 1], or 'tags' rescaled to their range) as
    colour images over a grey copy of the BGR ``image``, joint names written, as tall as the image.
    -> uint8 BGR (H, W_panel, 3)."""
    h, w = image.shape[:2]
    k = len(names)
    cols = int(math.ceil(math.sqrt(k)))
    rows = int(math.ceil(k / cols))
    th = max(1, h // rows)
    tw = max(1, int(round(th * w / h)))
    maps = _tile_maps(entries, key, k, (tw, th, tw / w, th / h))
    grey = cv2.cvtColor(cv2.cvtColor(cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA),
                                     cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    panel = np.zeros((h, cols * tw, 3), np.uint8)
    for j in range(k):
        m = maps[j]
        if key != 'heatmaps':
            lo, hi = float(m.min()), float(m.max())
            m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        colour = cv2.applyColorMap(np.clip(m * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
        tile = cv2.addWeighted(grey, 0.4, colour, 0.6, 0)
        cv2.putText(tile, names[j], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        r, c = divmod(j, cols)
        panel[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tile
    return panel


def with_panels(drawing, image, maps, names, bottom_up):
    """The drawing with the heatmap panel (and the tag panel for a bottom-up model) on its right."""
    panels = [drawing, map_panel(image, maps, names, 'heatmaps')]
    if bottom_up:
        panels.append(map_panel(image, maps, names, 'tags'))
    return np.concatenate(panels, axis=1)


# ----------------------------------------------------------------------------- writing

class ImageWriter:
    """Each drawing under its image's name in ``out_dir`` (the same format), written atomically."""

    def __init__(self, out_dir):
        self.out_dir, self.files = out_dir, []

    def write(self, frame, image):
        path = os.path.join(self.out_dir, frame.name)
        ok, data = cv2.imencode(os.path.splitext(frame.name)[1] or '.png', image)
        if not ok:
            raise DatasetError(f'{path}: cannot encode the drawing')
        self.files.append(atomic_write(path, lambda f: f.write(data.tobytes()), binary=True))

    def close(self, keep=True):
        pass


class VideoWriter:
    """``out_dir/<name>.mp4`` (mp4v) at ``fps``, opened at the first frame's size; written to a
    temporary file and renamed when closed."""

    def __init__(self, out_dir, name, fps):
        self.path = os.path.join(out_dir, f'{name}.mp4')
        self.tmp = os.path.join(out_dir, f'{name}.tmp{os.getpid()}.mp4')
        self.fps, self.writer, self.files = fps, None, []

    def write(self, frame, image):
        if self.writer is None:
            h, w = image.shape[:2]
            self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*'mp4v'), self.fps, (w, h))
            if not self.writer.isOpened():
                raise DatasetError(f'{self.path}: cannot write the video (OpenCV has no mp4v encoder here)')
        self.writer.write(np.ascontiguousarray(image))

    def close(self, keep=True):
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            if keep:
                os.replace(self.tmp, self.path)
                self.files.append(self.path)
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def result_entries(frame, people, with_name):
    """COCO results of one image's people (see the module docstring)."""
    out = []
    for p in people:
        entry = dict(image_id=frame.image_id, category_id=1,
                     keypoints=[round(float(v), 3) for v in p['keypoints'].reshape(-1)],
                     score=float(p['score']), box=[round(float(v), 3) for v in p['box']])
        if with_name:
            entry['file_name'] = frame.name
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- the run

def output_folder(opts, source):
    """--out, or the checkpoint's folder/demo; never the folder of the input images."""
    out = opts.out or os.path.join(os.path.dirname(os.path.abspath(opts.loadModel)), 'demo')
    inputs = {os.path.dirname(os.path.realpath(p)) for p in getattr(source, 'paths', [])}
    if os.path.realpath(out) in inputs:
        raise ConfigError(f'--out {out} holds the input images: the drawings would replace them; choose another folder')
    os.makedirs(out, exist_ok=True)
    return out


def _progress(source, opts):
    from tqdm import tqdm
    show = bool(getattr(opts, 'progress', True)) and (source.kind == 'video' or source.total > 1)
    return tqdm(total=source.total, unit=source.unit, desc='demo', disable=not show, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _warn(message):
    """One line on stderr that leaves the progress bar intact."""
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


def run_demo(opts, ckpt):
    """-demo PATH --loadModel CKPT (see the module docstring). Returns dict(out: the folder,
    files: the drawn images or the video, keypoints: the json's path, results: its entries,
    frames: images or frames done, skipped: unreadable images, seconds, fps)."""
    if ckpt is None:
        raise ConfigError('-demo needs --loadModel CKPT (the checkpoint to run)')
    source = open_source(opts.demo)
    try:
        device = pick_device(opts.gpuid)
        predictor = Predictor.from_checkpoint(opts.loadModel, device, ckpt=ckpt, opts=opts)
        if predictor.joint_set is None:
            raise ConfigError(f'-demo: --loadModel {opts.loadModel}: {opts.model} predicts no keypoints')
        if opts.heatmaps and predictor.codec.target not in ('heatmap', 'associative_embedding'):
            raise ConfigError(f'--heatmaps: {opts.model} predicts {predictor.codec.target}, not heatmaps')
        boxes = person_boxes(options_namespace(opts, detFile=given_det_file(opts, ckpt)), predictor, device)
        out_dir = output_folder(opts, source)
        writer = VideoWriter(out_dir, source.name, source.fps) if source.kind == 'video' else ImageWriter(out_dir)
        return _loop(opts, source, predictor, boxes, writer, out_dir)
    finally:
        source.close()


def _groups(source, size):
    """The source's frames in lists of ``size`` (the last one shorter)."""
    group = []
    for frame in source:
        group.append(frame)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _loop(opts, source, predictor, boxes, writer, out_dir):
    results, done, skipped = [], 0, []
    bar = _progress(source, opts)
    start = time.perf_counter()
    keep = True
    try:
        for group in _groups(source, 1 if source.live else FRAME_BATCH):
            readable = [f for f in group if f.image is not None]
            given = [boxes.boxes(f) for f in readable] if boxes is not None else None
            found = predictor.infer_many([f.image for f in readable], given, bgr=True, maps=opts.heatmaps)
            found = dict(zip((id(f) for f in readable), found))
            for frame in group:
                if frame.image is None:
                    skipped.append(frame.path)
                    _warn(f'warning: {frame.path}: corrupt or unreadable image; skipped')
                    bar.update(1)
                    continue
                people = found[id(frame)]
                drawing = draw_people(frame.image, people['people'], predictor.joint_set, opts.kptThreshold)
                if opts.heatmaps:
                    drawing = with_panels(drawing, frame.image, people['maps'], predictor.joint_names,
                                          predictor.bottom_up)
                writer.write(frame, drawing)
                results += result_entries(frame, people['people'], source.kind == 'images')
                done += 1
                bar.update(1)
    except KeyboardInterrupt:
        _warn(f'interrupted after {done} {source.unit}s; writing what is done')
    except BaseException:
        keep = False
        raise
    finally:
        bar.close()
        writer.close(keep)
    seconds = time.perf_counter() - start
    path = write_json(os.path.join(out_dir, 'keypoints.json'), results, indent=None)
    fps = done / seconds if seconds > 0 else 0.0
    print(f'demo: {done} {source.unit}{"s" if done != 1 else ""}, {len(results)} people, {fps:.1f} {source.unit}s/s; '
          f'wrote {", ".join(os.path.basename(f) for f in writer.files[:3])}{" ..." if len(writer.files) > 3 else ""} '
          f'and keypoints.json to {out_dir}')
    return dict(out=out_dir, files=list(writer.files), keypoints=path, results=results, frames=done,
                skipped=skipped, seconds=seconds, fps=fps)
