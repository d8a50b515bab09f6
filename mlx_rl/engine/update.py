"""The update step every chapter uses: differentiate a loss, clip, take one optimizer step.

A chapter supplies a loss `loss_fn(model, *arrays) -> (loss, metrics)`. The step
differentiates it with `nn.value_and_grad` (the forward pass runs *inside* the
differentiated function, so gradients are real), and runs in two compiled
phases, each ending in one `mx.eval`, so that every chapter reports the same
two timings:

    time/forward_backward_s   loss, metrics, gradients and their norm
    time/optimizer_s          clipping and AdamW (a dozen element-wise ops per
                              parameter that compile into one loop each)

Both are compiled with the model, optimizer and RNG state as inputs and outputs
(mlx-lm's trainer does the same): `state = [model.state, optimizer.state,
mx.random.state]`. The optimizer state must exist before it is captured, so the
step initialises it (after a resumed run has loaded its saved state: build the
step after `session.optimizer(...)`).

With micro_batch N the forward + backward runs N rows at a time and the
gradients, losses and metrics of the micro-batches add up (one `mx.eval` per
micro-batch: what bounds the memory is that each one's activations are freed
before the next is built). That is the full batch's update exactly when the
loss is a sum over rows divided by the full batch's counts, which every
chapter's loss already is (n_rows, n_tokens: the same rule that lets
data-parallel ranks add their gradients). Metrics add up the same way, except
`*_min` / `*_max` (the extremes) and per-row arrays (joined back in order).

The step checks the loss, the gradient norm and one cheap sum of the updated
weights (computed inside the optimizer phase): a non-finite value stops
the run at the step it appears (`NonFinite`), or, with `on_nan="skip"`, the
update is undone (the previous weights and optimizer state are kept: MLX arrays
are immutable, so holding on to them costs nothing) and the step is counted.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_rl.config import MlxRlError


class NonFinite(MlxRlError):
    """A loss, gradient norm or weight became NaN or infinite."""

    def __init__(self, metric, value):
        super().__init__(f"{metric} is {value}")
        self.metric, self.value = metric, value


def weight_sum(model):
    """One number that is finite exactly when no trainable weight is NaN or inf (or huge enough to overflow)."""
    return sum(p.sum() for _, p in tree_flatten(model.trainable_parameters()))


def make_update(model, optimizer, loss_fn, max_grad_norm=1.0, compile=True, on_nan="stop", timer=None, world=None,
                micro_batch=None, split=None, row_multiple=1):
    """Build `update(*arrays) -> (loss, metrics, grad_norm)` for a loss function.

    loss_fn(model, *arrays) -> (loss, metrics dict of scalars or arrays).
    on_nan: "stop" raises NonFinite at the first non-finite loss, gradient norm or
    weight; "skip" undoes that update and counts it in `update.skipped`.
    timer: a PhaseTimer (`with timer("phase"):`); None times nothing.
    world: a data-parallel World; its ranks' gradients are summed (time/allreduce_s)
    before clipping, so each rank's loss must be its share of the global loss.
    micro_batch: rows per forward + backward (None: the whole batch at once; 0: chosen from the
    model's size and the free memory, memory.auto_micro_batch, and printed). split(arrays, rows)
    cuts the arrays into micro-batches (default `split_rows`); row_multiple: a micro-batch
    holds a multiple of this many rows (GRPO's groups, whose prompt runs once per group).
    """
    optimizer.init(model.trainable_parameters())  # keeps any state already loaded by --resume
    clip_to = max_grad_norm if max_grad_norm > 0 else float("inf")  # inf: only measure the norm
    value_and_grad = nn.value_and_grad(model, lambda *arrays: loss_fn(model, *arrays))
    parallel = world is not None and world.size > 1

    def forward_backward(*arrays):
        (loss, metrics), grads = value_and_grad(*arrays)
        return loss, metrics, grads

    def apply(grads):
        grads, grad_norm = optim.clip_grad_norm(grads, clip_to)
        optimizer.update(model, grads)
        return grad_norm, weight_sum(model)

    if compile:
        state = [model.state, optimizer.state, mx.random.state]
        forward_backward = mx.compile(forward_backward, inputs=state, outputs=state)  # retraced per new input shape
        apply = mx.compile(apply, inputs=state, outputs=state)
    timer = timer or _no_timer

    split = split or split_rows
    chosen = {}  # (rows, tokens per row) -> rows per micro-batch, for micro_batch=0

    def micro_rows(arrays):
        rows, width = arrays[0].shape[0], (arrays[0].shape[1] if arrays[0].ndim > 1 else 1)
        if micro_batch is None or micro_batch >= rows:
            return rows
        if micro_batch > 0:
            return max(row_multiple, micro_batch // row_multiple * row_multiple)
        if (rows, width) not in chosen:
            from mlx_rl.engine import memory

            n, need = memory.auto_micro_batch(model, rows, width, memory.is_checkpointed(model), multiple=row_multiple)
            chosen[(rows, width)] = n
            if n == chosen.get("said"):
                return n
            chosen["said"] = n  # say it again only when the choice changes (an episode's width varies)
            print(f"micro-batch: {n} of {rows} rows x {width} tokens per forward/backward (about {need / 1e9:.1f} GB "
                  "of activations each; --micro-batch N to choose)")
        return chosen[(rows, width)]

    def accumulate(arrays):
        """The forward + backward of the whole batch, a micro-batch at a time."""
        size = micro_rows(arrays)
        parts = [arrays] if size >= arrays[0].shape[0] else split(arrays, size)
        total = None
        for part in parts:
            out = forward_backward(*part)
            total = out if total is None else add_up(total, out)
            mx.eval(total)
        return total

    def update(*arrays):
        with timer("forward_backward"):
            loss, metrics, grads = accumulate(arrays)
        if parallel:
            with timer("allreduce"):
                grads, loss = world.sum_tree((grads, loss))
                mx.eval(grads, loss)
        if not math.isfinite(loss.item()):
            return skip_or_stop(("loss", loss.item()), loss, metrics, mx.array(float("nan")))
        # (AdamW edits its nested state dicts in place: copy the containers; the arrays are shared, not copied)
        before = (model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)) if on_nan == "skip" else None
        with timer("optimizer"):
            grad_norm, total = apply(grads)
            mx.eval(grad_norm, total, model.state, optimizer.state)
        bad = first_non_finite({"gradient norm": grad_norm, "weights after the update": total})
        if bad:
            if before is not None:  # undo: the weights and optimizer state from before this update
                model.update(before[0])
                optimizer.state.update(before[1])
            return skip_or_stop(bad, loss, metrics, grad_norm)
        return loss, metrics, grad_norm

    def skip_or_stop(bad, loss, metrics, grad_norm):
        if on_nan != "skip":
            raise NonFinite(*bad)
        update.skipped += 1
        return loss, metrics, grad_norm

    update.skipped = 0  # updates skipped for a non-finite value (on_nan="skip")
    return update


def split_rows(arrays, size):
    """Micro-batches of `size` rows: every array with the batch's rows is cut; the rest (counts, flags,
    Python numbers) goes whole to each."""
    rows = arrays[0].shape[0]
    cut = lambda x, i: x[i : i + size] if isinstance(x, mx.array) and x.ndim > 0 and x.shape[0] == rows else x  # noqa: E731
    return [tuple(cut(x, i) for x in arrays) for i in range(0, rows, size)]


def add_up(total, part):
    """Two micro-batches' (loss, metrics, grads) as one: sums, except *_min / *_max and per-row arrays."""
    loss, metrics, grads = total
    part_loss, part_metrics, part_grads = part
    joined = {}
    for k, v in metrics.items():
        w = part_metrics[k]
        if v.ndim > 0:
            joined[k] = mx.concatenate([v, w])  # per-row arrays (GRPO's log-probs), in row order
        else:
            joined[k] = mx.minimum(v, w) if k.endswith("_min") else mx.maximum(v, w) if k.endswith("_max") else v + w
    return loss + part_loss, joined, tree_map(lambda a, b: a + b, grads, part_grads)


def first_non_finite(named):
    for name, value in named.items():
        v = value.item()
        if not math.isfinite(v):
            return name, v
    return None


class _NoTimer:
    def __call__(self, phase):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_no_timer = _NoTimer()


def make_optimizer(lr, steps, warmup=0, weight_decay=0.0, schedule="constant"):
    """AdamW with an optional linear warm-up, then a constant rate or a cosine decay to lr/20."""
    if schedule not in ("constant", "cosine"):
        raise MlxRlError(f"unknown learning-rate schedule '{schedule}' (constant or cosine)")
    after = optim.cosine_decay(lr, max(steps - warmup, 1), end=lr / 20) if schedule == "cosine" else None
    if warmup > 0:
        ramp = optim.linear_schedule(lr / warmup, lr, warmup)  # stays at lr after warm-up
        rate = optim.join_schedules([ramp, after], [warmup]) if after else ramp
    else:
        rate = after or lr
    return optim.AdamW(learning_rate=rate, weight_decay=weight_decay)


def current_lr(optimizer):
    lr = optimizer.learning_rate
    return lr.item() if hasattr(lr, "item") else float(lr)
