"""Plumbing every LLM chapter shares: the model to start from, the optimizer, the
update step, held-out evaluation, checkpoints, --resume and Ctrl-C.

A chapter supplies a loss `loss_fn(model, *arrays) -> (loss, metrics)`; the
update step differentiates it with `nn.value_and_grad` (the forward pass runs
inside the differentiated function, so gradients are real), compiles it, clips
the gradient norm and applies the optimizer. Each phase ends with one `mx.eval`
so the seconds it reports are its own.
"""

import dataclasses
import json
import signal
import sys
import threading
import typing
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_rl import lora
from mlx_rl.config import MlxRlError, RunConfig, option
from mlx_rl.models import get_model, restore_trainer_state, save_checkpoint
from mlx_rl.logprobs import reference_logprobs
from mlx_rl.rollout import generate
from mlx_rl.runs import Run, StopRequested
from mlx_rl.tasks import get_task


@dataclasses.dataclass
class LLMConfig(RunConfig):
    """Fields shared by the LLM chapters (after the RunConfig ones)."""

    preset: str = option("tiny", "size of a new model when --model is not given", choices=["micro", "tiny", "small"])
    digits: int = option(2, "addition: operand digits", min=1, max=6)
    sort_length: int = option(5, "sort: list length", min=2, max=12)
    mistake_rate: float = option(0.75, "share of corpus examples written with the task's systematic mistake", min=0.0, max=1.0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", min=0.0)
    eval_every: int = option(50, "evaluate held-out greedy accuracy every N steps (0: only at the end)", min=0)
    eval_prompts: int = option(500, "number of held-out prompts in each evaluation", min=1)
    chat_template: bool = option(False, "wrap prompts in the tokenizer's chat template")
    compile: bool = option(True, "compile the update step with mx.compile")
    lora_rank: int = option(0, "train LoRA adapters of this rank instead of all weights (0: full fine-tune)", min=0)
    lora_layers: int = option(-1, "LoRA: adapt the last N transformer blocks (-1: all)", min=-1)
    lora_scale: float = option(20.0, "LoRA: scale of the low-rank update (mlx-lm's `scale`, not alpha)", above=0.0)
    lora_keys: typing.Optional[str] = option(
        None, "LoRA: comma-separated layers inside a block to adapt, e.g. self_attn.q_proj,self_attn.v_proj (default: every linear layer)"
    )
    fuse: bool = option(True, "LoRA: also save the adapters fused into the base as RUN/checkpoint's weights (a plain mlx-lm model)")


def make_task(cfg):
    extra = {"addition": {"digits": cfg.digits}, "sort": {"length": cfg.sort_length}}.get(cfg.task, {})
    return get_task(cfg.task, mistake_rate=cfg.mistake_rate, **extra)


# --- the update step ---------------------------------------------------------


def make_update(model, optimizer, loss_fn, max_grad_norm=1.0, compile=True):
    """Build `update(*arrays, timer) -> (loss, metrics, grad_norm)` for a loss function.

    loss_fn(model, *arrays) -> (loss, metrics dict of scalars)
    """
    value_and_grad = nn.value_and_grad(model, lambda *arrays: loss_fn(model, *arrays))
    if compile:
        value_and_grad = mx.compile(value_and_grad, inputs=model.state, outputs=model.state)  # retraced per new input shape

    apply_gradients = make_apply_gradients(model, optimizer, max_grad_norm, compile)

    def update(*arrays, timer):
        with timer("forward_backward"):
            (loss, metrics), grads = value_and_grad(*arrays)
            mx.eval(loss, metrics, grads)
        with timer("optimizer"):
            grad_norm = apply_gradients(grads)
            mx.eval(grad_norm, model.parameters(), optimizer.state)
        return loss, metrics, grad_norm

    return update


def make_apply_gradients(model, optimizer, max_grad_norm=1.0, compile=True):
    """apply_gradients(grads) -> grad_norm: clip the gradient norm (unless max_grad_norm <= 0), then one
    optimizer step.

    Compiled, AdamW's dozen element-wise operations per parameter fuse into one loop
    each, which matters on a small model (tiny preset on a 2-core CPU: 11 -> 4 ms).
    The compiled function holds on to the optimizer's state dict, so it is built at
    the first call (after restore()) and again whenever that dict is replaced.
    """
    clip_to = max_grad_norm if max_grad_norm > 0 else float("inf")  # inf: only measure the norm

    def apply_gradients(grads):
        grads, grad_norm = optim.clip_grad_norm(grads, clip_to)
        optimizer.update(model, grads)
        return grad_norm

    if not compile:
        return apply_gradients
    compiled = {}  # id of the optimizer state dict it was built for -> compiled function

    def compiled_apply_gradients(grads):
        if not optimizer._initialized:  # the state must exist before it is captured
            optimizer.init(model.trainable_parameters())
        key = id(optimizer.state)
        if key not in compiled:
            compiled.clear()
            state = [model.state, optimizer.state]
            compiled[key] = mx.compile(apply_gradients, inputs=state, outputs=state)
        return compiled[key](grads)

    return compiled_apply_gradients


def make_fused_update(model, optimizer, loss_fn, max_grad_norm=1.0):
    """Like make_update(compile=True), but the whole step (gradient, clipping, AdamW) is one compiled
    function over [model.state, optimizer.state, mx.random.state], as mlx-lm's trainer does.

    One compiled graph and one mx.eval per step: on a small model, where per-op overhead rules, it
    saves about a fifth of the step. The phases can't be told apart, so it times one, `update`.
    Build it after restore(): the compiled function holds on to the optimizer's state dict.
    """
    value_and_grad = nn.value_and_grad(model, lambda *arrays: loss_fn(model, *arrays))
    optimizer.init(model.trainable_parameters())  # the state must exist before it is captured
    state = [model.state, optimizer.state, mx.random.state]

    def step(*arrays):
        (loss, metrics), grads = value_and_grad(*arrays)
        grads, grad_norm = optim.clip_grad_norm(grads, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.update(model, grads)
        return loss, metrics, grad_norm

    step = mx.compile(step, inputs=state, outputs=state)  # retraced per new input shape

    def update(*arrays, timer):
        with timer("update"):
            loss, metrics, grad_norm = step(*arrays)
            mx.eval(loss, metrics, grad_norm, model.state, optimizer.state)
        return loss, metrics, grad_norm

    return update


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


# --- evaluation -----------------------------------------------------------------


def evaluate(model, tokenizer, task, prompts, chat_template=False, batch_size=256, n_samples=8):
    """Greedy held-out accuracy and mean reward; returns (metrics, sample rows)."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        texts += generate(model, tokenizer, chunk, task.max_new_tokens, temperature=0.0, chat_template=chat_template).texts
    correct = np.array([task.is_correct(p, c) for p, c in zip(prompts, texts)])
    rewards = np.array([task.reward(p, c) for p, c in zip(prompts, texts)])
    kind = np.array([task.has_mistake(p) for p in prompts])
    metrics = {
        "eval/accuracy": float(correct.mean()),
        "eval/reward": float(rewards.mean()),
        # accuracy on the problems the corpus gets wrong, and on the rest
        "eval/accuracy_mistake_kind": float(correct[kind].mean()) if kind.any() else float("nan"),
        "eval/accuracy_other": float(correct[~kind].mean()) if (~kind).any() else float("nan"),
    }
    samples = [
        {"prompt": p, "completion": c, "reward": float(r), "correct": bool(k)}
        for p, c, r, k in list(zip(prompts, texts, rewards, correct))[:n_samples]
    ]
    return metrics, samples


# --- starting, checkpointing and resuming a run ---------------------------------


@dataclasses.dataclass
class Session:
    """Everything a chapter's loop needs, set up the same way for every chapter."""

    run: Run
    model: typing.Any
    tokenizer: typing.Any
    model_config: dict
    task: typing.Any
    start_step: int = 0
    rng: np.random.Generator = None
    trainer_state: dict = None
    adapter_config: dict = None  # LoRA runs: mlx-lm's adapter_config.json (None: full fine-tune)


def latest_pretrain_checkpoint(task_name, runs_dir="runs"):
    """The newest runs/pretrain-*/checkpoint trained on this task, or None."""
    best = None
    for ckpt in Path(runs_dir).glob("*/checkpoint"):
        try:
            run_cfg = json.loads((ckpt.parent / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if run_cfg.get("command") == "pretrain" and run_cfg.get("task") == task_name:
            if best is None or ckpt.stat().st_mtime > best.stat().st_mtime:
                best = ckpt
    return best


def resolve_policy_model(cfg):
    """RL chapters start from a trained model: --model, else the newest pretrain run for the task."""
    if cfg.model or cfg.resume:
        return
    found = latest_pretrain_checkpoint(cfg.task)
    if found is None:
        raise MlxRlError(
            f"no --model given and no pretrain run for task '{cfg.task}' under runs/: "
            f"run `mlx-rl pretrain --task {cfg.task}` first, or pass --model DIR"
        )
    print(f"starting from {found}")
    cfg.model = str(found)


class Reference:
    """The frozen reference policy: log-probs without gradients.

    With full fine-tuning it is a second model object holding the starting
    weights. MLX arrays are immutable and the optimizer replaces (never edits)
    the policy's arrays, so sharing them at the start costs no copy.

    With LoRA the base weights never change, so the reference is the policy
    itself with its adapters switched off: no second copy at all.
    """

    def __init__(self, model):
        if lora.has_lora(model):
            self.model = lora.AdaptersOff(model)  # calls run the base: every LoRA layer swapped for its frozen layer
            self.calls = 0
            return
        if lora.is_quantized(model):
            # A quantised model can't be rebuilt from its args, and is never trained in full
            # (start() refuses it), so it serves as its own frozen reference.
            self.model = model
            self.model.freeze()
            self.model.eval()
            self.calls = 0
            return
        self.model = type(model)(model.args)
        self.model.update(model.parameters())
        self.model.freeze()
        self.model.eval()
        self.calls = 0  # tests check that beta = 0 never evaluates the reference

    def logprobs(self, tokens, temperature=1.0):
        self.calls += 1
        return reference_logprobs(self.model, tokens, temperature)


def starting_reference(session):
    """The reference for a KL term: the policy the run started from, also on --resume.

    With LoRA that is the policy with its adapters off (no copy, also when resuming);
    with full fine-tuning, on --resume, --model is loaded again (the checkpoint has moved on).
    """
    if session.adapter_config is not None or session.start_step == 0:
        return Reference(session.model)
    cfg = session.run.config
    return Reference(get_model(cfg.model, cfg.preset, cfg.seed)[0])


def check_model(cfg, model, tokenizer):
    """One-line errors for settings the loaded model can't honour."""
    if getattr(cfg, "chat_template", False) and not getattr(tokenizer, "has_chat_template", True):
        raise MlxRlError(f"--chat-template: the tokenizer of {cfg.model or 'the new model'} has no chat template (use --no-chat-template)")
    if not getattr(cfg, "lora_rank", 0):
        if lora.is_quantized(model):
            raise MlxRlError(f"--model {cfg.model} is quantised: its weights can't be trained directly; train LoRA adapters (--lora-rank 8)")
    elif not cfg.model:
        raise MlxRlError("LoRA adapts an existing checkpoint: pass --model DIR (or a hub name) with --lora-rank")


def setup_lora(model, cfg):
    """Freeze the model and add LoRA adapters as cfg asks; returns mlx-lm's adapter config."""
    keys = [k.strip() for k in cfg.lora_keys.split(",") if k.strip()] if cfg.lora_keys else None
    adapter_config = lora.apply_lora(model, cfg.lora_rank, cfg.lora_layers, cfg.lora_scale, keys, base=cfg.model)
    print(lora.describe(model, adapter_config))
    return adapter_config


def start(command, cfg):
    """Create (or reopen with --resume) the run directory and load the model."""
    task = make_task(cfg)
    if cfg.resume and getattr(cfg, "lora_rank", 0):
        # LoRA: the base is --model, unchanged; the checkpoint holds the adapters (and the base fused with them).
        run, state = Run.open_for_resume(cfg)
        from mlx_rl.runs import find_checkpoint

        model, tokenizer, model_config = get_model(cfg.model)
        adapter_config = setup_lora(model, cfg)
        lora.load_adapter_weights(model, find_checkpoint(run.path) / "adapters")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["numpy_rng"]
        return Session(run, model, tokenizer, model_config, task, state["step"], rng, state, adapter_config)
    if cfg.resume:
        run, state = Run.open_for_resume(cfg)
        from mlx_rl.runs import find_checkpoint

        model, tokenizer, model_config = get_model(str(find_checkpoint(run.path)))
        rng = np.random.default_rng()
        rng.bit_generator.state = state["numpy_rng"]
        return Session(run, model, tokenizer, model_config, task, state["step"], rng, state)
    model, tokenizer, model_config = get_model(cfg.model, cfg.preset, cfg.seed)
    check_model(cfg, model, tokenizer)
    run = Run.create(command, cfg)
    mx.random.seed(cfg.seed)
    adapter_config = setup_lora(model, cfg) if getattr(cfg, "lora_rank", 0) else None
    return Session(run, model, tokenizer, model_config, task, 0, np.random.default_rng(cfg.seed), None, adapter_config)


def save(session, step, optimizer, extra_state=None, extra_arrays=None):
    """extra_arrays: {file name: {name: array}} saved inside the checkpoint (e.g. PPO's value head)."""
    state = {
        "step": int(step),
        "wall_s": session.run.wall_s,
        "numpy_rng": session.rng.bit_generator.state,
        **(extra_state or {}),
    }
    if session.adapter_config is None:
        save_checkpoint(session.run.checkpoint_dir, session.model, session.tokenizer, session.model_config, state, optimizer, extra_arrays=extra_arrays)
        return
    # LoRA: RUN/checkpoint/adapters/ in mlx-lm's format (`--adapter-path`, with the base model), and,
    # with --fuse, the base fused with the adapters as the checkpoint's own weights.
    fuse = getattr(session.run.config, "fuse", True)
    arrays = {**(extra_arrays or {}), "adapters/adapters.safetensors": lora.adapter_weights(session.model)}
    files = {"adapters/adapter_config.json": json.dumps(session.adapter_config, indent=2) + "\n"}
    with lora.fused(session.model) if fuse else nullcontext():
        save_checkpoint(session.run.checkpoint_dir, session.model, session.tokenizer, session.model_config, state, optimizer,
                        extra_arrays=arrays, extra_files=files, save_weights=fuse)


def restore(session, optimizer):
    """After building the optimizer: load its state (and MLX's RNG) when resuming."""
    if session.trainer_state is not None:
        from mlx_rl.runs import find_checkpoint

        restore_trainer_state(find_checkpoint(session.run.path), optimizer)


@contextmanager
def interruptible(session, get_state):
    """Ctrl-C finishes the current step, saves a checkpoint, then stops with a one-line message.

    The first Ctrl-C only sets a flag; `Run.log` raises StopRequested after writing
    that step's metrics, so the checkpoint holds exactly the logged steps and
    --resume continues as if nothing happened. A second Ctrl-C stops at once,
    leaving the last periodic checkpoint. get_state() -> (step, optimizer) or
    (step, optimizer, dict of save()'s keyword arguments).
    """
    run = session.run

    def on_sigint(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit now)", file=sys.stderr)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        yield
    except StopRequested:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # don't cut the save short
        step, optimizer, *save_kwargs = get_state()  # optionally a third item: save()'s extra_state / extra_arrays
        save(session, step, optimizer, **(save_kwargs[0] if save_kwargs else {}))
        raise MlxRlError(f"interrupted at step {step}; checkpoint saved. Continue with: --resume {run.path}") from None
    except KeyboardInterrupt:
        raise MlxRlError(f"stopped; the last periodic checkpoint in {run.path} is intact (--resume {run.path})") from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def step_seed(cfg, step):
    """Seed MLX's RNG from (seed, step) at the start of each step, so --resume samples the same tokens."""
    mx.random.seed(cfg.seed * 1_000_003 + step)


def peak_memory_gb():
    return mx.get_peak_memory() / 1e9
