"""Checkpoints that describe themselves.

Format 2 (written by this code)::

    format         2
    arch           {option: value} of the options the model's from_opts read (models.build_model)
    config         {option: value as text}: every resolved option of the run (opts.as_text)
    meta           joint set (name, names, flip pairs, skeleton, OKS sigmas, head segment),
                   input and output size, the codec's settings
    optimizer_type the optimiser the optimiser state belongs to
    state_dict, optimizer, scaler, epoch, best, best_epoch, headline, history, torch_rng, cuda_rng

So a checkpoint alone rebuilds its model, codec and joint metadata (``-test --loadModel`` needs no
config file, and neither does ``utils.predictor.Predictor.from_checkpoint``). Format 1 (the first
spine: ``arch`` with a fixed list of keys, no config or meta) still loads; the configuration must
then come from the config files, as it always did.
"""
import io
import os

import torch

from datasets.joints import JointSet
from utils.errors import CheckpointError
from utils.io import atomic_write

FORMAT = 2
# what a format-1 checkpoint's optimiser state holds, per optimiser
_OPTIMIZER_STATE = {'square_avg': 'RMSprop', 'exp_avg': 'Adam', 'momentum_buffer': 'SGD'}


def save(obj, path):
    """torch.save through the atomic write: a crash mid-write keeps the previous file. The
    checkpoint is serialised in memory first, so a full disk shows as the operating system's
    'No space left on device' on the write, not as a torch serialisation error."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)


def load(path):
    """The checkpoint dict at ``path`` (read with weights_only: a file cannot run code).

    Also accepts the weight files that authors release (HRNet's ``pose_hrnet_*``, SimpleBaselines'
    ``pose_resnet_*``, HigherHRNet's ``pose_higher_hrnet_*``): a bare state dict, or one wrapped
    under 'state_dict' or 'model', with or without DataParallel's 'module.' prefix. Those come back
    as {'state_dict': ..., 'released': True}: weights alone, no options, no optimiser state.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'--loadModel {path}: no such file')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated, not a torch file, or a pickle with code in it
        first = str(e).splitlines()[0][:120] if str(e) else ''
        raise CheckpointError(f'--loadModel {path}: not a readable checkpoint ({type(e).__name__}: {first})') from None
    if isinstance(ckpt, dict) and 'format' in ckpt and isinstance(ckpt.get('state_dict'), dict):
        return ckpt
    state = released_state(ckpt)
    if state is None:
        raise CheckpointError(f'--loadModel {path}: neither a checkpoint of this framework nor a state dict of '
                              f'tensors (got {type(ckpt).__name__})')
    return {'state_dict': state, 'released': True}


def released_state(obj):
    """A state dict of tensors from a released weight file's content, the 'module.' prefix of
    DataParallel removed; None when it holds none."""
    if isinstance(obj, dict):
        for key in ('state_dict', 'model'):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    return {(k[7:] if k.startswith('module.') else k): v for k, v in obj.items()}


def config_defaults(ckpt):
    """{option: text} a checkpoint recorded (format 2), or None (format 1)."""
    config = ckpt.get('config')
    return dict(config) if isinstance(config, dict) else None


def joint_meta(joint_set):
    return dict(name=joint_set.name, names=list(joint_set.names),
                flip_pairs=[list(p) for p in joint_set.flip_pairs],
                skeleton=[list(p) for p in joint_set.skeleton],
                sigmas=list(joint_set.sigmas) if joint_set.sigmas is not None else None,
                head=list(joint_set.head) if joint_set.head is not None else None,
                upper_body=list(joint_set.upper_body))


def make_meta(joint_set, codec, opts):
    return dict(joints=joint_meta(joint_set) if joint_set is not None else None, input_size=str(opts.inputRes), output_size=str(opts.outputRes),
                codec=codec.settings())


def joint_set_of(ckpt):
    """The JointSet a format-2 checkpoint recorded (None for format 1)."""
    meta = (ckpt.get('meta') or {}).get('joints')
    if not meta:
        return None
    return JointSet(name=meta['name'], names=tuple(meta['names']),
                    flip_pairs=tuple(tuple(p) for p in meta['flip_pairs']),
                    skeleton=tuple(tuple(p) for p in meta['skeleton']),
                    sigmas=tuple(meta['sigmas']) if meta.get('sigmas') is not None else None,
                    head=tuple(meta['head']) if meta.get('head') is not None else None,
                upper_body=tuple(meta.get('upper_body') or ()))


def check_compatible(ckpt, model, path):
    """One line naming what differs between the checkpoint's model and the configured one.

    Only the options the configured model reads (``model.arch``) are compared, so an option it
    does not use (``--baseName`` for an hourglass) never refuses a checkpoint.
    """
    saved = ckpt.get('arch') or {}
    want = model.arch
    if 'model' in saved and saved['model'] != want['model']:
        keys = ['model', 'nJoints']
    else:
        keys = list(want)
    diffs = [f'{k} {saved[k]!r} vs {want[k]!r}' for k in keys if k in saved and saved[k] != want[k]]
    if diffs:
        raise CheckpointError(f'--loadModel {path}: checkpoint does not fit this model: ' + ', '.join(diffs[:4])
                              + ' (checkpoint vs configured)')


def optimizer_type_of(ckpt):
    """The optimiser a checkpoint's optimiser state belongs to (recorded, or read off the state)."""
    if ckpt.get('optimizer_type'):
        return ckpt['optimizer_type']
    for state in (ckpt.get('optimizer') or {}).get('state', {}).values():
        for key, name in _OPTIMIZER_STATE.items():
            if key in state:
                return name
    return None


def load_weights(model, state, path):
    """Copy ``state`` into ``model`` after checking every tensor's name and shape; a mismatch is one
    line saying which tensors differ and, where the model can tell (``options_from_state``), which
    options the file was made with (``--nJoints 17``, ``--baseName resnet101``, ...)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f'{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})')
        if missing:
            parts.append(f'{len(missing)} missing tensors (e.g. {missing[0]})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})')
        raise CheckpointError(f'--loadModel {path}: weights do not fit this model: ' + '; '.join(parts)
                              + _options_hint(model, state))
    model.load_state_dict(state)


def _options_hint(model, state):
    """'; the file was made with --nJoints 17 (configured: 16)' when the model can read its options
    off a state dict and they differ from its own."""
    read = getattr(type(model), 'options_from_state', None)
    if read is None:
        return ''
    try:
        found = read(state)
    except Exception:  # noqa: BLE001 -- a state dict of another architecture altogether
        return '; it does not look like a state dict of this architecture'
    arch = getattr(model, 'arch', {})
    diffs = [f'--{k} {v} (configured: {arch[k]})' for k, v in found.items() if k in arch and arch[k] != v]
    return ('; the file was made with ' + ', '.join(diffs)) if diffs else ''
