"""Starting or resuming a run, in one path read top to bottom: `start(command, cfg) -> Session`.

    1. the task (data and rewards) is built and checked: a bad data file or reward
       stops here, in seconds, before any model is loaded or any file written;
    2. with --resume, the run's checkpoint and trainer state are read (a run
       killed before its first checkpoint starts again from step 0, in place);
    3. the model is loaded: --model (or a new tiny model), or the checkpoint
       being resumed; LoRA adapters are added, and loaded back on --resume;
    4. only then is the run directory created or reopened, and config.json
       written with the settings actually used.

The Session then holds everything a chapter's step needs (model, tokenizer,
task, numpy RNG, timer, the data-parallel world) and the services the loop
uses: optimizers restored on resume, the update step, the frozen reference,
held-out evaluation and checkpoints.
"""

import dataclasses
import json
import typing
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_rl.config import MlxRlError, RunConfig, option
from mlx_rl.data.tasks import TaskConfig, make_task
from mlx_rl.engine import lora, memory, speed, trackers
from mlx_rl.engine.checkpoint import read_trainer_state, restore_optimizer, save_checkpoint
from mlx_rl.engine.distributed import World
from mlx_rl.engine.evaluate import evaluate
from mlx_rl.engine.logprobs import reference_logprobs
from mlx_rl.engine.models import get_model
from mlx_rl.engine.update import make_optimizer, make_update
from mlx_rl.runs import PhaseTimer, Run, atomic_write_text, check_out_dir, dumps, find_checkpoint


@dataclasses.dataclass
class LLMConfig(RunConfig, TaskConfig):
    """Fields shared by the LLM chapters (after the RunConfig and TaskConfig ones)."""

    model: typing.Optional[str] = option(
        None, "checkpoint directory or hub name to start from (pretrain: default a new tiny model; grpo/ppo/dpo: "
        "default the newest runs/pretrain-* checkpoint of the task)")
    chat_template: bool = option(False, "wrap prompts in the tokenizer's chat template")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", min=0.0, resumable=True)
    eval_every: int = option(50, "evaluate on held-out data every N steps: greedy accuracy (0: only at the start and the end)",
                             min=0, resumable=True)
    eval_prompts: int = option(500, "held-out prompts in each evaluation", min=1)
    save_every: int = option(0, "also save a checkpoint every N steps (0: at evaluations, every --save-minutes, and at the end)",
                             min=0, resumable=True)
    save_minutes: float = option(3.0, "save a checkpoint at least this often, in minutes of training (0: off)", min=0.0,
                                 resumable=True)
    on_nan: str = option("stop", "a non-finite loss, gradient or weight: stop the run at that step (keeping the last good "
                         "checkpoint), or skip that update and go on", choices=["stop", "skip"], resumable=True)
    compile: bool = option(True, "compile the update step with mx.compile", resumable=True)
    lora_rank: int = option(0, "train LoRA adapters of this rank instead of all weights (0: full fine-tune)", min=0)
    lora_layers: int = option(-1, "LoRA: adapt the last N transformer blocks (-1: all)", min=-1)
    lora_scale: float = option(20.0, "LoRA: scale of the low-rank update (mlx-lm's `scale`, not alpha)", above=0.0)
    lora_keys: typing.Optional[str] = option(
        None, "LoRA: comma-separated layers inside a block to adapt, e.g. self_attn.q_proj,self_attn.v_proj "
        "(default: every linear layer)")
    fuse: bool = option(True, "LoRA: also save the adapters fused into the base as RUN/checkpoint's weights (a plain "
                        "mlx-lm model)")


@dataclasses.dataclass
class MemoryConfig:
    """What a training step holds at once (engine/memory.py), for the chapters that train a policy on rollouts
    or pairs: GRPO, PPO, DPO."""

    micro_batch: int = option(0, "rows per forward/backward, their gradients added up: the same update as the "
                              "whole batch in less memory (0: chosen from the model's size and the free memory)",
                              min=0, resumable=True)
    grad_checkpoint: bool = option(False, "activation checkpointing: each transformer block runs its forward again in "
                                   "the backward instead of keeping its activations (less memory, more compute)",
                                   resumable=True)


class Reference:
    """The frozen reference policy: log-probs without gradients.

    With full fine-tuning it is a second model object holding the starting
    weights. MLX arrays are immutable and the optimizer replaces (never edits)
    the policy's arrays, so sharing them at the start costs no copy.
    With LoRA the base weights never change, so the reference is the policy
    itself with its adapters switched off: no second copy at all.
    """

    def __init__(self, model):
        self.calls = 0  # tests check that a zero KL coefficient never evaluates the reference
        if lora.has_lora(model):
            self.model = lora.AdaptersOff(model)  # calls run the base: every LoRA layer swapped for its frozen layer
            return
        if lora.is_quantized(model):
            # A quantised model can't be rebuilt from its args and is never trained in full
            # (check_model refuses it), so it serves as its own frozen reference.
            self.model = model
            return
        self.model = type(model)(model.args)
        self.model.update(model.parameters())
        self.model.freeze()
        self.model.eval()

    def logprobs(self, tokens, temperature=1.0, **layout):
        """(B, T-1) log-probs of tokens[:, 1:]; layout: token_logprobs' group_size, shared_len and skip."""
        self.calls += 1
        return reference_logprobs(self.model, tokens, temperature, **layout)


@dataclasses.dataclass
class Session:
    """Everything a chapter's step and the loop need, set up the same way for every chapter."""

    command: str
    cfg: typing.Any
    run: Run
    model: typing.Any
    tokenizer: typing.Any
    model_config: dict
    task: typing.Any
    world: World
    rng: np.random.Generator
    start_step: int = 0
    trainer_state: typing.Optional[dict] = None  # the checkpoint's, on --resume
    checkpoint: typing.Optional[Path] = None  # the checkpoint resumed from
    adapter_config: typing.Optional[dict] = None  # LoRA runs: mlx-lm's adapter_config.json (None: full fine-tune)
    timer: PhaseTimer = dataclasses.field(default_factory=PhaseTimer)
    optimizers: dict = dataclasses.field(default_factory=dict)  # name -> optimizer, saved in every checkpoint
    updates: list = dataclasses.field(default_factory=list)  # the update steps built, for their skip counts
    keep_state: dict = dataclasses.field(default_factory=dict)  # chapter figures saved with every checkpoint
    step: int = 0  # the step being trained (set by seed_step)
    _reference: typing.Any = None
    _heldout: typing.Any = None

    @property
    def chapter_state(self):
        """What the chapter saved with the checkpoint resumed from ({} for a new run)."""
        return (self.trainer_state or {}).get("chapter", {})

    def optimizer(self, lr, steps, warmup=0, weight_decay=0.0, schedule="constant", name="policy", updates_per_step=1):
        """AdamW (see update.make_optimizer), its state loaded back on --resume, saved with every checkpoint.

        steps and warmup count training steps, as --steps and --warmup do in every chapter; a chapter that makes
        several optimizer updates per step (GRPO's epochs, PPO's minibatches) says how many.
        """
        optimizer = make_optimizer(lr, steps * updates_per_step, warmup * updates_per_step, weight_decay, schedule)
        if self.checkpoint is not None:
            restore_optimizer(self.checkpoint, name, optimizer)
        self.optimizers[name] = optimizer
        return optimizer

    def update_step(self, loss_fn, optimizer, model=None, timer=None, split=None, row_multiple=1):
        """The update step for a loss (update.make_update) with this run's clipping, compile and NaN settings.

        timer: where its phases are timed (default the session's: time/forward_backward_s, time/optimizer_s).
        A chapter with --micro-batch (MemoryConfig) gets it, with its own split / row_multiple if its rows
        come in pairs or groups.
        """
        cfg = self.cfg
        update = make_update(model or self.model, optimizer, loss_fn, cfg.max_grad_norm, cfg.compile, cfg.on_nan,
                             timer or self.timer, world=self.world, micro_batch=getattr(cfg, "micro_batch", None),
                             split=split, row_multiple=row_multiple)
        self.updates.append(update)
        return update

    @property
    def reference(self):
        """The policy the run started from, also on --resume; built the first time it is asked for.

        With LoRA that is the policy with its adapters off (no copy); with full fine-tuning,
        on --resume, the starting --model is loaded again (the checkpoint has moved on).
        """
        if self._reference is None:
            if self.adapter_config is not None or self.start_step == 0:
                self._reference = Reference(self.model)
            else:
                self._reference = Reference(get_model(self.cfg.model, getattr(self.cfg, "preset", "tiny"), self.cfg.seed,
                                                      self.task.chars())[0])
        return self._reference

    def heldout(self):
        if self._heldout is None:
            self._heldout = self.task.heldout_rows(self.cfg.eval_prompts, seed=self.cfg.seed)
        return self._heldout

    def evaluate(self, n_samples=8):
        """Held-out greedy figures of the current policy: (metrics, sample rows). ({}, []) when the task has
        no held-out prompts or no reward (a plain-text corpus)."""
        if self.task.rewards is None or not self.heldout():
            return {}, []
        with self.timer("eval"):
            return evaluate(self.model, self.tokenizer, self.task, self.heldout(), self.cfg.chat_template,
                            n_samples=n_samples, world=self.world)

    def seed_step(self, step):
        """Seed MLX's RNG from (seed, step) at the start of each step, so --resume samples the same tokens.

        (MLX's global RNG key can't be saved and set back, so it is derived instead.)
        """
        self.step = step
        mx.random.seed(self.cfg.seed * 1_000_003 + step)

    def save(self, step, chapter_state=None, extra_arrays=None):
        """A checkpoint of the current step (rank 0 writes it; the others only wait for the step to be done)."""
        if not self.run.writer:
            return
        with self.timer("save"):
            state = {"step": int(step), "wall_s": self.run.wall_s, "numpy_rng": self.rng.bit_generator.state,
                     "chapter": {**self.keep_state, **(chapter_state or {})}}
            if self.adapter_config is None:
                save_checkpoint(self.run.checkpoint_dir, self.model, self.tokenizer, self.model_config, state,
                                self.optimizers, extra_arrays=extra_arrays)
                return
            # LoRA: RUN/checkpoint/adapters/ in mlx-lm's format (`--adapter-path`, with the base model), and,
            # with --fuse, the base fused with the adapters as the checkpoint's own weights.
            fuse = getattr(self.cfg, "fuse", True)
            arrays = {**(extra_arrays or {}), "adapters/adapters.safetensors": lora.adapter_weights(self.model)}
            files = {"adapters/adapter_config.json": json.dumps(self.adapter_config, indent=2) + "\n"}
            with lora.fused(self.model) if fuse else nullcontext():
                save_checkpoint(self.run.checkpoint_dir, self.model, self.tokenizer, self.model_config, state,
                                self.optimizers, extra_arrays=arrays, extra_files=files, save_weights=fuse)


    def mark_finished(self):
        """Mark the last checkpoint as the end of a finished run (after summary.json is written): --resume of it
        then says so. A run killed between its last save and this finishes its summary on --resume."""
        if not self.run.writer or find_checkpoint(self.run.path) is None:
            return
        path = find_checkpoint(self.run.path) / "trainer_state.json"
        state = json.loads(path.read_text())
        state.setdefault("chapter", {})["finished"] = True
        atomic_write_text(path, dumps(state))


def latest_pretrain_checkpoint(task_name, runs_dir="runs"):
    """The newest runs/*/checkpoint of a pretrain run on this task, or None."""
    best = None
    for ckpt in Path(runs_dir).glob("*/checkpoint"):
        try:
            run_cfg = json.loads((ckpt.parent / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if run_cfg.get("command") == "pretrain" and run_cfg.get("task") == task_name and not run_cfg.get("data"):
            if best is None or ckpt.stat().st_mtime > best.stat().st_mtime:
                best = ckpt
    return best


def resolve_policy_model(cfg):
    """RL chapters start from a trained model: --model, else the newest pretrain run for the task."""
    if cfg.model or cfg.resume:
        return
    found = latest_pretrain_checkpoint(cfg.task) if not cfg.data else None
    if found is None:
        hint = f"run `mlx-rl pretrain --task {cfg.task}` first, or " if not cfg.data else ""
        raise MlxRlError(f"no --model given and no pretrain run for task '{cfg.data or cfg.task}' under runs/: {hint}pass --model DIR")
    print(f"starting from {found}")
    cfg.model = str(found)


def check_model(cfg, model, tokenizer, task=None):
    """One-line errors for settings (and data) the loaded model can't honour."""
    has_template = getattr(tokenizer, "has_chat_template", True)
    if cfg.chat_template and not has_template:
        raise MlxRlError(f"--chat-template: the tokenizer of {cfg.model or 'the new model'} has no chat template "
                         "(use --no-chat-template)")
    unk = getattr(tokenizer, "unk_token_id", None)
    chars = task.chars() if task is not None and unk is not None else ""
    if chars and unk in tokenizer.encode(chars, add_special_tokens=False):
        missing = [c for c in chars if unk in tokenizer.encode(c, add_special_tokens=False)]
        shown = ", ".join(repr(c) for c in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise MlxRlError(f"the tokenizer of {cfg.model or 'the model'} has no token for {shown}, which the data uses: "
                         f"it would read them all as {tokenizer.unk_token!r} (pretrain a new model on this data, or "
                         "pick a model whose vocabulary covers it)")
    rows = getattr(getattr(task, "data", None), "train", None) or []
    chat_row = next((r for r in rows[:1000] if isinstance(r, dict) and isinstance(r.get("prompt"), list)), None)
    if chat_row is not None and not has_template:
        where = getattr(chat_row, "where", "a row")
        raise MlxRlError(f"{where}: the prompt is a list of chat messages, but the tokenizer of "
                         f"{cfg.model or 'the new model'} has no chat template to write them with")
    if not cfg.lora_rank:
        if lora.is_quantized(model):
            raise MlxRlError(f"--model {cfg.model} is quantised: its weights can't be trained directly; train LoRA "
                             "adapters (--lora-rank 8)")
    elif not cfg.model:
        raise MlxRlError("LoRA adapts an existing checkpoint: pass --model DIR (or a hub name) with --lora-rank")


def setup_lora(model, cfg, verbose=True):
    """Freeze the model and add LoRA adapters as cfg asks; returns mlx-lm's adapter config."""
    keys = [k.strip() for k in cfg.lora_keys.split(",") if k.strip()] if cfg.lora_keys else None
    adapter_config = lora.apply_lora(model, cfg.lora_rank, cfg.lora_layers, cfg.lora_scale, keys, base=cfg.model)
    if verbose:
        print(lora.describe(model, adapter_config))
    return adapter_config


def start(command, cfg, mistake_rate=0.75, corpus=False, precheck=None):
    """Create (or reopen with --resume) the run and load its model: one path for every chapter.

    precheck(model, tokenizer, model_config, task, world) runs after the model is loaded and
    before anything is written (a chapter's batch-size check: `batch_check`).
    """
    world = World.from_launcher()
    # 1. the task: data and rewards checked before anything is loaded or written (and the trackers installed)
    trackers.check(cfg.log_to)
    task = make_task(cfg, mistake_rate, corpus)
    if world.rank == 0:
        notice = speed.blas_notice()
        if notice:
            print(notice)
    if not cfg.resume:
        if cfg.out is not None:
            check_out_dir(cfg.out)

    # 2. what we resume from: the last checkpoint (None: killed before its first one, start again)
    ckpt = state = None
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            if state.get("chapter", {}).get("finished") and not more_to_do(cfg, state):
                more = "--rounds" if command == "dpo" else "--steps"
                raise AlreadyFinished(f"{cfg.resume} already finished at step {state['step']}: nothing to do "
                                      f"(a larger {more} extends it)")
        else:
            weights = [p for name in ("checkpoint", "checkpoint.old") for p in (Path(cfg.resume) / name).glob("*.safetensors")]
            if weights:  # weights without the trainer's state: starting over would write over them
                raise MlxRlError(f"--resume {cfg.resume}: {weights[0].parent} has weights but no trainer_state.json, so "
                                 f"it cannot be continued; start a new run from it with --model {weights[0].parent}")
            if world.rank == 0:
                print(f"{cfg.resume} has no checkpoint yet: starting it again from step 0")

    # 3. the model: the checkpoint being resumed (full fine-tune), else --model or a new tiny model
    lora_resume = ckpt is not None and cfg.lora_rank > 0  # LoRA: the base is --model; the checkpoint holds adapters
    source = str(ckpt) if ckpt is not None and not lora_resume else cfg.model
    model, tokenizer, model_config = get_model(source, getattr(cfg, "preset", "tiny"), cfg.seed, task.chars())
    if ckpt is None:
        check_model(cfg, model, tokenizer, task)
        mx.random.seed(cfg.seed)  # LoRA's random A matrices come from --seed (a resumed run loads its own)
    adapter_config = setup_lora(model, cfg, verbose=world.rank == 0) if cfg.lora_rank else None
    if lora_resume:
        lora.load_adapter_weights(model, ckpt / "adapters")
    if getattr(cfg, "grad_checkpoint", False):
        memory.checkpoint_blocks(model)
    world.check_same_weights(model)
    if precheck is not None:
        precheck(model, tokenizer, model_config, task, world)

    # 4. the run directory, written only now
    runtime = {**speed.runtime(), "world_size": world.size, "backend": world.backend}
    writer = world.rank == 0
    if cfg.resume:
        run = Run.reopen(cfg, state["step"] if state else 0, state["wall_s"] if state else 0.0, command, runtime, writer)
    else:
        run = Run.create(command, cfg, runtime, writer)
    rng = np.random.default_rng(cfg.seed)
    if state is not None:
        rng.bit_generator.state = state["numpy_rng"]
    else:
        mx.random.seed(cfg.seed)
    return Session(command, cfg, run, model, tokenizer, model_config, task, world, rng,
                   start_step=state["step"] if state else 0, trainer_state=state, checkpoint=ckpt,
                   adapter_config=adapter_config)


class AlreadyFinished(MlxRlError):
    exit_code = 0


def more_to_do(cfg, state):
    """Does resuming this finished run have work left? (A chapter's config can say otherwise: DPO's rounds.)"""
    if hasattr(cfg, "more_to_do"):
        return cfg.more_to_do(state)
    return cfg.steps > state["step"]


def check_memory(model, model_config, rows, tokens_per_row, what, micro_batch=None, sample_rows=None):
    """Refuse, in one line, a batch whose training pass can't fit in memory (instead of a crash mid-run).

    A rough upper estimate of one forward + backward over `rows` x `tokens_per_row`
    tokens: float32 logits with their softmax and gradient (about 12 bytes per
    vocabulary entry per token; one chunk of them where logprobs.py scores them in
    chunks) and the activations kept for the backward (about 40 bytes per hidden
    unit per layer per token), plus the weights and Adam state. micro_batch: rows
    per forward/backward (0: chosen to fit, so only one row has to). sample_rows: rows the sampler
    generates at once (None: all of them).
    """
    from mlx_rl.engine.logprobs import LOGITS_CHUNK, plain_head

    vocab = model_config.get("vocab_size", 0)
    hidden = model_config.get("hidden_size", 0)
    layers = model_config.get("num_hidden_layers", 0)
    have = available_memory_bytes()
    weights = 16 * sum(v.size for _, v in tree_flatten(model.parameters()))
    # the rollout samples sample_rows rows at once: their KV cache (keys and values, float32, every layer) and
    # one position's logits per row, whatever the micro-batch of the training pass
    kv_dim = 2 * layers * (model_config.get("num_key_value_heads") or model_config.get("num_attention_heads") or 1) * \
        (model_config.get("head_dim") or hidden // max(model_config.get("num_attention_heads") or 1, 1))
    sampled = min(rows, sample_rows or rows)
    rollout = sampled * (4 * kv_dim * tokens_per_row + 8 * vocab) + weights
    if have and rollout > have:
        raise MlxRlError(f"{what}: sampling {sampled:,} rows x {tokens_per_row} tokens at once needs about "
                         f"{rollout / 1e9:.1f} GB, more than the {have / 1e9:.1f} GB available; make the batch smaller")
    if micro_batch is not None:
        rows = min(rows, micro_batch or 1)
    tokens = rows * tokens_per_row
    logits = 12 * LOGITS_CHUNK if LOGITS_CHUNK and plain_head(model) else 12 * vocab * tokens
    need = tokens * 40 * hidden * layers + logits + weights
    if have and need > have:
        raise MlxRlError(f"{what}: {rows:,} rows x {tokens_per_row} tokens need about {need / 1e9:.1f} GB for one "
                         f"training pass, more than the {have / 1e9:.1f} GB available; make the batch smaller")


def batch_check(rows, new_tokens, what, micro_batch=None, sample_rows=None):
    """A start() precheck: the memory of a batch of `rows` completions of `new_tokens` (0: the task's) after its prompts."""

    def check(model, tokenizer, model_config, task, world):
        sample = task.train_rows(np.random.default_rng(0), 8)
        prompt_len = max(len(tokenizer.encode(r["prompt"] if isinstance(r["prompt"], str) else str(r["prompt"])))
                         for r in sample) if sample else 0
        check_memory(model, model_config, max(rows // world.size, 1), prompt_len + (new_tokens or task.max_new_tokens), what,
                     micro_batch, sample_rows)

    return check


def available_memory_bytes():
    """Memory this process can still use: MemAvailable on Linux, the device's memory on Metal; None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        info = mx.metal.device_info() if mx.metal.is_available() else {}
        return info.get("max_recommended_working_set_size") or info.get("memory_size")
    except Exception:
        return None


def peak_memory_gb():
    return mx.get_peak_memory() / 1e9
