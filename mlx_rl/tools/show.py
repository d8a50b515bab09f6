"""Printing intermediates the way a reader opening a step wants them: name, shape, dtype, the values.

    show("advantages", advantages)       # advantages  (2, 4) float32
                                         # [[ 1.5 -0.5 -0.5 -0.5] ...]
    show("metrics", metrics)             # one line per entry, arrays as numbers

Used by the notebooks (notebooks/) so that every intermediate is shown with its shape.
"""

import numpy as np


def as_numpy(x):
    try:
        import mlx.core as mx

        if isinstance(x, mx.array):
            return np.array(x)
    except ImportError:
        pass
    return np.asarray(x)


def show(name, x, digits=3, rows=8, columns=16):
    """Print `name`, its shape and dtype, then its values (at most `rows` x `columns` of them)."""
    if isinstance(x, dict):
        print(f"{name}:")
        for k, v in x.items():
            v = as_numpy(v)
            print(f"  {k:<28} {v.item():.{digits}g}" if v.size == 1 else f"  {k:<28} {v.shape} {v.dtype}")
        return
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
        print(f"{name}  ({len(x)},) text")
        for s in x[:rows]:
            print(f"  {s!r}")
        return
    a = as_numpy(x)
    print(f"{name}  {a.shape} {a.dtype}")
    if a.ndim == 0:
        print(f"  {a.item():.{digits}g}" if a.dtype.kind == "f" else f"  {a.item()}")
        return
    view = a[:rows] if a.ndim == 1 else a[:rows, :columns] if a.ndim == 2 else a[:rows, :columns, :4]
    with np.printoptions(precision=digits, suppress=True, linewidth=120, threshold=10_000):
        text = np.array2string(view)
    print("  " + text.replace("\n", "\n  "))
    if view.shape != a.shape:
        print(f"  (first {' x '.join(map(str, view.shape))} shown)")
