"""Data-parallel training on MLX's own distributed engine (`mx.distributed`, started by `mlx.launch`).

A run started under the launcher (`mlx.launch -n 2 -- mlx-rl grpo ...`) is
data-parallel with no other change to its command line. Every rank holds the
whole model; the global batch is the one a single process would use, split in
contiguous blocks (`World.shard`): rank r takes rows [r*B/W, (r+1)*B/W). Each
rank samples and scores its rows, computes gradients of its share of the loss,
and the gradients are summed across ranks (`World.sum_tree`): each chapter
writes its loss as a sum over the global batch divided by global counts, so
the summed gradient is exactly the single-process one. Metrics and held-out
evaluations are reduced the same way, so the log shows global figures. Only
rank 0 writes the run directory.

A rank that fails prints its own one-line error (prefixed with its rank) and
exits; the others see their next collective fail ("connection to a peer was
lost") and stop with one line naming the failure. A rank that hangs instead
(alive but silent) is caught by a watchdog on every rank: no step finished
within MLX_RL_RANK_TIMEOUT seconds (default 900) stops the run.

Outside the launcher `World` is a world of one, and every method is a no-op.
"""

import os
import sys
import threading
import time
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_rl.config import MlxRlError


class RankFailed(MlxRlError):
    exit_code = 4


class World:
    """The ranks of a data-parallel run (a world of one outside `mlx.launch`)."""

    def __init__(self, group=None, backend="none"):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.backend = backend
        self.last_progress = time.monotonic()
        self.bytes_reduced = 0  # payload bytes this rank has put into collectives (for planning multi-machine runs)

    @contextmanager
    def guard(self):
        """Around the training loop: a collective that fails because another rank died becomes one line,
        and a watchdog stops this rank if no step finishes for MLX_RL_RANK_TIMEOUT seconds."""
        if self.size == 1:
            yield
            return
        timeout = float(os.environ.get("MLX_RL_RANK_TIMEOUT", "900"))
        done = threading.Event()

        def watchdog():
            while not done.wait(5.0):
                if time.monotonic() - self.last_progress > timeout:
                    print(f"error (rank {self.rank} of {self.size}): no step finished in {timeout:.0f} s; another rank "
                          "is stuck or unreachable; stopping", file=sys.stderr, flush=True)
                    os._exit(RankFailed.exit_code)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            yield
        except RuntimeError as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "ring" in text or "peer" in text or "connection" in text.lower() or "socket" in text.lower():
                raise RankFailed(f"rank {self.rank} of {self.size}: stopped, another rank failed ({text})") from None
            raise
        finally:
            done.set()

    def progress(self):
        """A step finished: the watchdog's clock starts again."""
        self.last_progress = time.monotonic()

    @classmethod
    def from_launcher(cls):
        """Join the launcher's group when started by `mlx.launch` (it sets MLX_RANK), else a world of one."""
        if "MLX_RANK" not in os.environ or not mx.distributed.is_available():
            return cls()
        backend = os.environ.get("MLX_RL_BACKEND", "any")
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except Exception as e:
            raise MlxRlError(f"could not join the distributed group ({backend} backend): {str(e).splitlines()[0]}") from None
        name = os.environ.get("MLX_RL_BACKEND") or (
            "jaccl" if any(k.startswith(("MLX_IBV", "MLX_JACCL")) for k in os.environ)
            else "ring" if os.environ.get("MLX_HOSTFILE") else "mpi" if "OMPI_COMM_WORLD_RANK" in os.environ else backend)
        return cls(group, name) if group.size() > 1 else cls()

    def shard(self, rows):
        """This rank's contiguous block of a global list (whole blocks: the caller keeps groups aligned)."""
        if self.size == 1:
            return rows
        n = len(rows)
        return rows[self.rank * n // self.size : (self.rank + 1) * n // self.size]

    def gather_rows(self, x, pad_value=0):
        """Every rank's block of rows of an mx array, concatenated in rank order. (b, T, ...) -> (B, T_max, ...)

        Blocks may differ in rows and in their second axis (prompts of other lengths): they are padded
        with pad_value to the longest first.
        """
        if self.size == 1:
            return x
        shape = np.array(mx.distributed.all_gather(mx.array([x.shape[0]] + list(x.shape[1:2]), dtype=mx.int32)[None],
                                                   group=self.group))  # (W, 1 or 2)
        rows, longest = shape[:, 0], int(shape[:, 1].max()) if x.ndim > 1 else None
        pad = [(0, int(rows.max()) - x.shape[0])] + ([(0, longest - x.shape[1])] if x.ndim > 1 else [])
        pad += [(0, 0)] * (x.ndim - len(pad))
        padded = mx.pad(x, pad, constant_values=pad_value)
        gathered = mx.distributed.all_gather(padded, group=self.group)
        n = int(rows.max())
        return mx.concatenate([gathered[r * n : r * n + int(rows[r])] for r in range(self.size)], axis=0)

    def gather(self, values):
        """The global array from each rank's block of rows (rank order is row order). (b, ...) -> (B, ...)"""
        values = np.asarray(values)
        if self.size == 1:
            return values
        counts = np.array(mx.distributed.all_gather(mx.array([len(values)], dtype=mx.int32), group=self.group))
        longest = int(counts.max())
        padded = np.zeros((longest, *values.shape[1:]), dtype=np.float32)
        padded[: len(values)] = values
        gathered = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group))  # (W * longest, ...)
        blocks = [gathered[r * longest : r * longest + int(counts[r])] for r in range(self.size)]
        return np.concatenate(blocks).astype(values.dtype)

    def all_json(self, obj):
        """Every rank's JSON-able object, in rank order (for small per-rank results: DPO's pairs).
        Sent as UTF-8 bytes through all_gather."""
        if self.size == 1:
            return [obj]
        import json

        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        return [json.loads(bytes(blob).decode()) for blob in self.gather_bytes(data)]

    def gather_bytes(self, data):
        counts = np.array(mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=self.group))
        longest = int(counts.max())
        padded = np.zeros(longest, dtype=np.int32)
        padded[: len(data)] = data
        gathered = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group))
        return [gathered[r * longest : r * longest + int(counts[r])].astype(np.uint8) for r in range(self.size)]

    def sum(self, values):
        """Element-wise sum over ranks of a numpy array (float64 sums are sent as float32)."""
        if self.size == 1:
            return values
        arr = mx.distributed.all_sum(mx.array(np.asarray(values, dtype=np.float32)), group=self.group)
        return np.array(arr, dtype=np.float64)

    def reduce_metrics(self, metrics):
        """Global figures from each rank's: keys ending in _min / _max take the min / max over ranks, the
        rest are shares of a global mean (a sum over this rank's rows divided by a global count) and add up."""
        if self.size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        local = mx.array([float(metrics[k]) for k in keys], dtype=mx.float32)
        gathered = np.array(mx.distributed.all_gather(local[None], group=self.group))  # (W, K)
        out = {}
        for j, k in enumerate(keys):
            column = gathered[:, j]
            out[k] = float(column.min() if k.endswith("_min") else column.max() if k.endswith("_max") else column.sum())
        return out

    def sum_tree(self, tree):
        """All-reduce (sum) a tree of arrays, flattened into one buffer per dtype to send few messages."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        if not flat:
            return tree
        sizes = [v.size for _, v in flat]
        buffer = mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in flat])
        self.bytes_reduced += buffer.size * 4
        buffer = mx.distributed.all_sum(buffer, group=self.group)
        out, offset = [], 0
        for (k, v), n in zip(flat, sizes):
            out.append((k, buffer[offset : offset + n].reshape(v.shape).astype(v.dtype)))
            offset += n
        return tree_unflatten(out)

    def check_same_weights(self, model):
        """Every rank must start from the same weights (same seed, same checkpoint): checked once."""
        if self.size == 1:
            return
        total = sum(mx.sum(v.astype(mx.float32)) for _, v in tree_flatten(model.trainable_parameters()))
        totals = self.sum(np.array([float(total.item())]) * np.eye(self.size)[self.rank])
        if not np.allclose(totals, totals[0], rtol=1e-6):
            raise MlxRlError(f"the ranks start from different weights (sums {totals.tolist()}): give every rank the same "
                             "--model and --seed")


def zeros_like_tree(tree):
    return tree_map(mx.zeros_like, tree)
