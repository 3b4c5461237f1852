"""Plots of a run: training curves per epoch (``curves.png``) and the score per joint
(``per_joint.png``), drawn with matplotlib's Agg canvas (no display, no pyplot state) into a PNG
in memory, then written through the atomic write: a crash mid-write keeps the previous picture.
"""
import io
import math

from utils.errors import ConfigError
from utils.io import atomic_write

# the skeleton colours of vis.draw (left blue, right orange, centre green), as matplotlib RGB
SIDE_COLOURS = {'L': (40 / 255, 120 / 255, 1.0), 'R': (1.0, 140 / 255, 0.0), 'C': (40 / 255, 200 / 255, 80 / 255)}
AP_COLOUR, AR_COLOUR = '#3a78c9', '#e8892b'
DPI = 100


def _figure(width, height):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError('plots need the matplotlib package: pip install matplotlib') from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _write(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=DPI)
    data = buffer.getvalue()
    return atomic_write(path, lambda f: f.write(data), binary=True)


def _number(value):
    """A finite float, or None (json writes NaN as null; a missing entry is None)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _series(history, get):
    """(epochs, values) of the entries where ``get(entry)`` is a finite number."""
    xs, ys = [], []
    for i, entry in enumerate(history):
        value = _number(get(entry))
        if value is not None:
            xs.append(entry.get('epoch', i + 1))
            ys.append(value)
    return xs, ys


def headline_name(table):
    """What a validation table's headline is, for an axis label."""
    table = table or {}
    if 'AP' in table:
        return 'OKS AP'
    if 'Top-1' in table:
        return 'Top-1 accuracy (%)'
    if 'Mean' in table:
        return 'PCK, Mean (%)'
    return 'validation score'


def _integer_epochs(ax):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes, color='0.45')


def _log_if_positive(ax, values):
    if values and min(values) > 0:
        ax.set_yscale('log')


def write_curves(path, history):
    """``curves.png`` of a run's history (the trainer's per-epoch records): the training loss and
    each of its terms (log scale), the validation score (``val_headline``, where an epoch was
    evaluated; the best one marked) and the learning rate, per epoch. Returns ``path``."""
    history = [h for h in (history or []) if isinstance(h, dict)]
    fig = _figure(15, 4.2)
    loss_ax, val_ax, lr_ax = fig.subplots(1, 3)

    xs, ys = _series(history, lambda h: h.get('train_loss'))
    plotted = list(ys)
    terms = []
    for h in history:
        for name in (h.get('train_loss_terms') or {}):
            if name not in terms:
                terms.append(name)
    if xs:
        loss_ax.plot(xs, ys, marker='o', ms=3, lw=2, color='k', label='total' if terms else 'loss')
    for name in terms:
        txs, tys = _series(history, lambda h: (h.get('train_loss_terms') or {}).get(name))
        txs, tys = zip(*[(x, y) for x, y in zip(txs, tys) if y > 0]) if any(y > 0 for y in tys) else ((), ())
        if txs:
            loss_ax.plot(txs, tys, marker='.', ms=4, lw=1.2, label=name)
            plotted += list(tys)
    _log_if_positive(loss_ax, plotted)
    if not plotted:
        _empty(loss_ax, 'no training epoch yet')
    elif terms:
        loss_ax.legend(fontsize=8)
    loss_ax.set_title('training loss')
    loss_ax.set_xlabel('epoch')
    loss_ax.set_ylabel('loss (log scale)' if loss_ax.get_yscale() == 'log' else 'loss')

    table = next((h['val'] for h in reversed(history) if isinstance(h.get('val'), dict)), None)
    name = headline_name(table)
    vxs, vys = _series(history, lambda h: h.get('val_headline'))
    if vxs:
        val_ax.plot(vxs, vys, marker='o', ms=4, lw=2, color=AP_COLOUR)
        best = max(range(len(vys)), key=lambda i: vys[i])
        val_ax.plot([vxs[best]], [vys[best]], marker='*', ms=14, color='#d62728', ls='none',
                    label=f'best {vys[best]:.4g} (epoch {vxs[best]})')
        val_ax.legend(fontsize=8, loc='best')
    else:
        _empty(val_ax, 'not evaluated yet')
    val_ax.set_title('validation')
    val_ax.set_xlabel('epoch')
    val_ax.set_ylabel(name)

    lxs, lys = _series(history, lambda h: h.get('lr'))
    if lxs:
        lr_ax.plot(lxs, lys, marker='o', ms=3, lw=1.5, color='#2ca02c', drawstyle='steps-post')
        _log_if_positive(lr_ax, lys)
    else:
        _empty(lr_ax, 'no learning rate recorded')
    lr_ax.set_title('learning rate (at the start of each epoch)')
    lr_ax.set_xlabel('epoch')
    lr_ax.set_ylabel('learning rate' + (' (log scale)' if lr_ax.get_yscale() == 'log' else ''))

    epochs = set(xs) | set(vxs) | set(lxs)
    for ax in (loss_ax, val_ax, lr_ax):
        _integer_epochs(ax)
        ax.grid(True, which='major', alpha=0.3)
        if len(epochs) == 1:                     # one point: a visible range around it
            ax.set_xlim(min(epochs) - 1, max(epochs) + 1)
        elif epochs and not ax.lines:            # an empty panel spans the epochs of the others
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    fig.tight_layout()
    return _write(fig, path)


def _side(name):
    n = str(name).lower()
    if n.startswith(('l_', 'left')):
        return 'L'
    if n.startswith(('r_', 'right')):
        return 'R'
    return 'C'


def _annotate(ax, bars, values, fmt):
    for bar, value in zip(bars, values):
        if value is not None:
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords='offset points', ha='center', va='bottom', fontsize=7)


def write_per_joint(path, table, title=None):
    """``per_joint.png`` of a metric table: PCK per joint as bars (left joints blue, right orange,
    centre green, the Mean as a line) when the table has 'per_joint'; for a COCO table the AP and
    AR breakdown (AP, AP .5, AP .75, AP (M), AP (L), AR ...); for any other table its scalar
    columns. Returns ``path``."""
    table = dict(table or {})
    per_joint = table.get('per_joint') or {}
    if per_joint:
        names = list(per_joint)
        values = [_number(per_joint[n]) for n in names]
        fig = _figure(max(7.0, 0.5 * len(names) + 2), 4.8)
        ax = fig.subplots()
        bars = ax.bar(range(len(names)), [v if v is not None else 0 for v in values],
                      color=[SIDE_COLOURS[_side(n)] for n in names], edgecolor='0.3', lw=0.5)
        _annotate(ax, bars, values, '{:.1f}')
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha='right', fontsize=9)
        from matplotlib.patches import Patch
        handles = [Patch(facecolor=SIDE_COLOURS[s], edgecolor='0.3', label=label)
                   for s, label in (('L', 'left'), ('R', 'right'), ('C', 'centre')) if any(_side(n) == s for n in names)]
        mean = _number(table.get('Mean'))
        if mean is not None:
            handles.append(ax.axhline(mean, color='k', ls='--', lw=1, label=f'Mean {mean:.2f}'))
        # above the axes, right of the title: never over a bar
        ax.legend(handles=handles, fontsize=8, loc='lower right', bbox_to_anchor=(1.0, 1.0), ncol=len(handles),
                  frameon=False, borderaxespad=0.2)
        top = max([v for v in values if v is not None] + [1.0])
        ax.set_ylim(0, 105 if top <= 100 else top * 1.08)
        ax.set_xlabel('joint')
        ax.set_ylabel('PCK (%)')
    elif 'AP' in table:
        keys = [k for k in table if isinstance(k, str) and k.startswith(('AP', 'AR')) and _number(table[k]) is not None]
        values = [_number(table[k]) for k in keys]
        fig = _figure(max(7.0, 0.7 * len(keys) + 2), 4.5)
        ax = fig.subplots()
        bars = ax.bar(range(len(keys)), values, color=[AP_COLOUR if k.startswith('AP') else AR_COLOUR for k in keys],
                      edgecolor='0.3', lw=0.5)
        _annotate(ax, bars, values, '{:.3f}')
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, fontsize=9)
        ax.set_ylim(0, 1.08 if max(values + [0]) <= 1 else max(values) * 1.08)
        ax.set_xlabel('COCO keypoint metric (OKS): all, at OKS .5 / .75, medium (M) and large (L) people')
        ax.set_ylabel('AP / AR')
    else:
        keys = [k for k, v in table.items() if _number(v) is not None]
        values = [_number(table[k]) for k in keys]
        fig = _figure(max(6.0, 0.8 * len(keys) + 2), 4.5)
        ax = fig.subplots()
        if keys:
            bars = ax.bar(range(len(keys)), values, color=AP_COLOUR, edgecolor='0.3', lw=0.5)
            _annotate(ax, bars, values, '{:.2f}')
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(keys, rotation=30, ha='right', fontsize=9)
        else:
            _empty(ax, 'no scores')
        ax.set_xlabel('metric')
        ax.set_ylabel('score')
    ax.set_title(title or 'validation', loc='left' if per_joint else 'center')
    ax.grid(True, axis='y', alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    return _write(fig, path)
