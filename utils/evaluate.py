"""Evaluate a prediction file against a dataset's official ground truth, without any model.

    python -m utils.evaluate mpii --pred pred.mat --gt gt_valid.mat
    python -m utils.evaluate coco --pred results.json --gt person_keypoints_val2017.json
    python -m utils.evaluate lsp  --pred pred.mat --gt joints.mat [--split test|all]
    python -m utils.evaluate lip  --pred pred.csv --gt lip_val_annotations.csv

Each prints the benchmark's standard table; ``--out FILE.json`` also writes {column: value}
(per-joint values nested under 'per_joint'; NaN written as null). A missing or malformed file
is a one-line ``error: ...`` naming it, with exit status 1.
"""
import argparse
import os
import sys

import numpy as np

if __package__ in (None, ''):         # run as a script: make the project importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import formats  # noqa: E402
from utils import metrics  # noqa: E402
from utils.errors import DatasetError, PoseError  # noqa: E402
from utils.io import write_json  # noqa: E402

_fail = formats.fail


# ---------------------------------------------------------------------------------------------
# One function per benchmark: args -> (title, table)
# ---------------------------------------------------------------------------------------------

def eval_mpii(args):
    preds = formats.load_pred_mat(args.pred)
    try:
        table = metrics.mpii_official(preds, args.gt)
    except DatasetError as exc:
        if str(exc).startswith('predictions have shape'):         # name the predictions file
            raise DatasetError(f'{args.pred}: {exc}') from None
        raise
    return f'MPII PCKh@0.5 ({len(preds)} persons, {os.path.basename(args.gt)})', table


def _load_coco_results(path):
    results = formats.load_json(path)
    if not isinstance(results, list):
        raise _fail(path, 'expected a json list of results')
    for n, r in enumerate(results):
        if not isinstance(r, dict) or 'image_id' not in r or 'keypoints' not in r:
            raise _fail(path, f"result {n} lacks 'image_id' or 'keypoints'")
        try:
            kp = np.asarray(r['keypoints'], np.float64)
        except (ValueError, TypeError):
            raise _fail(path, f"result {n}: 'keypoints' is not a list of numbers") from None
        if kp.size % 3:
            raise _fail(path, f"result {n}: {kp.size} keypoint values, not a multiple of 3")
    if not results:
        raise _fail(path, 'no results')
    return results


def eval_coco(args):
    results = _load_coco_results(args.pred)
    try:
        table = metrics.coco_oks_ap(results, args.gt, verbose=args.verbose)
    except DatasetError as exc:
        if str(exc).startswith('result'):             # name the results file
            raise DatasetError(f'{args.pred}: {exc}') from None
        raise
    return f'COCO keypoint OKS AP ({len(results)} instances, {os.path.basename(args.gt)})', table


def eval_lsp(args):
    gt, visible, _ = formats.read_lsp_joints(args.gt)
    n_all = len(gt)
    if args.split == 'test':
        if n_all != 2000:
            raise _fail(args.gt, f'{n_all} images; the LSP test split (images 1001-2000) needs '
                                 'the 2000-image LSP joints.mat (use --split all for others)')
        gt, visible = gt[1000:], visible[1000:]
    preds = formats.load_pred_mat(args.pred)
    if preds.shape[1] != 14:
        raise _fail(args.pred, f"'preds' has {preds.shape[1]} joints, expected 14 (LSP)")
    if args.split == 'test' and len(preds) == n_all:
        preds = preds[1000:]                          # a file covering all 2000 images
    if len(preds) != len(gt):
        raise _fail(args.pred, f'{len(preds)} predictions, expected {len(gt)} '
                               f'(split {args.split} of {args.gt})')
    scored = visible if args.visible_only else np.ones_like(visible)
    table = metrics.lsp_pck_table(preds, gt, scored, alpha=0.2)
    return f'LSP PCK@0.2 ({len(gt)} images, split {args.split})', table


def eval_lip(args):
    gt_names, gt, gt_vis, _ = formats.read_lip_csv(args.gt)
    names, preds, _, _ = formats.read_lip_csv(args.pred)
    index = {}
    for i, n in enumerate(names):
        if n in index:
            raise _fail(args.pred, f'image {n} appears twice')
        index[n] = i
    absent = [n for n in gt_names if n not in index]
    if absent:
        raise _fail(args.pred, f'no prediction for {len(absent)} of {len(gt_names)} images of '
                               f'{args.gt}, e.g. {absent[0]}')
    order = np.array([index[n] for n in gt_names])
    table = metrics.lip_pckh_table(preds[order], gt, gt_vis, alpha=0.5)
    return f'LIP PCKh@0.5 ({len(gt_names)} persons)', table


# ---------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        prog='python -m utils.evaluate',
        description='Evaluate a prediction file against official ground truth (no model).')
    sub = p.add_subparsers(dest='benchmark', required=True, metavar='{mpii,coco,lsp,lip}')

    def common(sp):
        sp.add_argument('--out', metavar='FILE.json', help='also write {column: value} here')
        sp.add_argument('--per-joint', action='store_true', help='also print per-joint values')

    sp = sub.add_parser('mpii', help='MPII validation PCKh@0.5 (official gt_valid.mat)')
    sp.add_argument('--pred', required=True, metavar='pred.mat',
                    help="key 'preds', N x 16 x 2, 1-BASED pixels (0-based + 1), in the order "
                         'of the 2958 validation persons')
    sp.add_argument('--gt', required=True, metavar='gt_valid.mat', help='official MPII gt')
    common(sp)
    sp.set_defaults(func=eval_mpii)

    sp = sub.add_parser('coco', help='COCO keypoint OKS AP (pycocotools)')
    sp.add_argument('--pred', required=True, metavar='results.json',
                    help='json list of {image_id, keypoints (17x3 or 51: x, y, score), '
                         'box_score, area}; rescored and OKS-NMSed here as the HRNet code')
    sp.add_argument('--gt', required=True, metavar='person_keypoints.json',
                    help='COCO person keypoints annotations')
    sp.add_argument('--verbose', action='store_true', help="show pycocotools' output")
    common(sp)
    sp.set_defaults(func=eval_coco)

    sp = sub.add_parser('lsp', help='LSP PCK@0.2 (torso = left shoulder - right hip)')
    sp.add_argument('--pred', required=True, metavar='pred.mat',
                    help="key 'preds', N x 14 x 2 in LSP joint order and image order, in the "
                         "SAME pixel frame as joints.mat (MATLAB 1-based: the project's 0-based "
                         'coordinates + 1); for --split test either the 1000 test images or '
                         'all 2000')
    sp.add_argument('--gt', required=True, metavar='joints.mat',
                    help='LSP (3x14x2000, flag 0 = visible) or LSP-extended (14x3x10000, '
                         'flag 1 = visible) joints.mat')
    sp.add_argument('--split', choices=('test', 'all'), default='test',
                    help='test: LSP images 1001-2000 (default); all: every image of the file')
    sp.add_argument('--visible-only', action='store_true',
                    help='score only joints flagged visible (the standard protocol scores '
                         'all 14)')
    common(sp)
    sp.set_defaults(func=eval_lsp)

    sp = sub.add_parser('lip', help='LIP PCKh@0.5 (head = head top - upper neck)')
    sp.add_argument('--pred', required=True, metavar='pred.csv',
                    help='LIP csv, no header: ImageID_PersonID.jpg then 16 x (x, y) or '
                         '16 x (x, y, occluded), MPII joint order, same pixel frame as --gt; '
                         'rows matched by image name')
    sp.add_argument('--gt', required=True, metavar='lip_val_annotations.csv',
                    help='LIP annotations csv (nan = unlabelled joint)')
    common(sp)
    sp.set_defaults(func=eval_lip)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    title, table = args.func(args)
    print(metrics.format_table(table, title=title))
    if args.per_joint and table.get('per_joint'):
        print(metrics.format_per_joint(table))
    if args.out:
        try:
            write_json(args.out, table, indent=2)
        except OSError as exc:
            raise _fail(args.out, f'cannot write ({exc.strerror})') from None
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except PoseError as exc:
        sys.exit(f'error: {exc}')
