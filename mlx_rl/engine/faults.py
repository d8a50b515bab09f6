"""Fault injection for the reliability tests: kill this process at a named point.

    MLX_RL_KILL_AT=<point>:<n>   SIGKILL ourselves the n-th time `point` is reached

Points: "after_log" (a step's metrics are on disk, its checkpoint is not),
"mid_save" (the new checkpoint is written to its temporary folder, not yet
swapped in), "mid_swap" (the old checkpoint is renamed away, the new one not yet
in place), "before_finish" (the last step is saved, the summary not yet written). Unset (always, outside the tests), `reached()` costs one dict lookup.
"""

import os
import signal

_counts = {}


def reached(point):
    spec = os.environ.get("MLX_RL_KILL_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
