"""Episodes: multi-turn rollouts, where the model acts and an environment answers, batched.

The environment protocol (a user's environment is `--env path/to/file.py:make`):

    make(row) -> env            one environment per episode; `row` is a data row (its prompt and every other
                                column) plus "episode_seed", an int to seed the environment's own randomness
    env.reset() -> str          the first observation, appended after the prompt ("" for none)
    env.step(text) -> (observation, reward, done)
                                `text` is the model's turn; observation is a str, or None to let the model go
                                on; reward a number (summed over the episode); done ends the episode
  optional attributes, read once per episode:
    env.stop     strings that end the model's turn when it writes them, e.g. ["</calc>"] (EOS always does)
    env.role     the chat role of observations when prompts use a chat template (default "user"; "tool")
    env.solved   read at the end: did the episode succeed? (default: its summed reward is at least 1)
    env.info     read at the end: a dict of numbers, logged as env/<name> (the calculator's tool_calls)

One step of every row is one model call on the whole batch, as in `sampling.generate`:

    prompt + first observation      prefilled once per distinct prompt, the cache copied to its group
    repeat until every episode is done or --max-turns:
        the model's turn            sampled token by token until EOS, a stop string or --max-turn-tokens;
                                    rows whose turn has ended (or whose episode has) ride along, masked
        env.step(turn text)         per row, in Python (the environment is Python)
        the observations            tokenized once and appended to every row that has one, in one call

Rows end their turns and their episodes at different moments: each row's tokens are only the columns it
really wrote (`RaggedKVCache` marks the others invalid for every later token), and the RoPE position of a
row's token is its position in the row's own transcript, so the training pass, which lays the transcript out
contiguously, scores exactly the ids and positions the sampler saw. Token in, token out: the trainer gets
these ids; it never re-tokenises the transcript's text, so a chat template that would render earlier turns
differently (Qwen3 drops old <think> blocks) cannot change what is trained.

What comes back is a Rollout (sampling.py) whose completion is the whole episode after the prompt:
  completion_ids (B, N)  the model's and the environment's tokens, in order (pad after the end)
  mask           (B, N)  1 on the model's own tokens only: the only ones any loss, KL or entropy reads
  env_mask       (B, N)  1 on the environment's tokens (present for the model to read, never trained)
  logprobs       (B, N)  the sampler's log-prob of each model token, 0 elsewhere
plus `episodes`: per row the summed reward, success, turns, each turn's reward at its last token (PPO's
per-turn credit) and the transcript as (role, text) segments for display.
"""

import dataclasses
import math
import numbers

import mlx.core as mx
import numpy as np

from mlx_rl.config import MlxRlError
from mlx_rl.engine.logprobs import sampled_distribution
from mlx_rl.engine.sampling import Rollout, _categorical, _split_keys, distinct_rows, encode_prompts, row_keys

TURN_ENDS = ("eos", "stop", "length")  # why a model turn ended


@dataclasses.dataclass
class EnvSpec:
    """An environment and the limits of its episodes."""

    make: object  # make(row) -> env
    name: str  # for messages: "icemaze", "calc.py:make"
    max_turns: int = 8  # model turns per episode at most
    max_turn_tokens: int = 64  # tokens per model turn at most


class EnvError(MlxRlError):
    """The user's environment raised or broke the protocol: one line naming it, the turn and the row."""


def row_label(row, index):
    where = getattr(row, "where", None)
    if where:
        return f"row {index} ({where})"
    prompt = row.get("prompt") if isinstance(row, dict) else None
    return f"row {index}" + (f" (prompt {prompt!r:.60})" if isinstance(prompt, str) and prompt else "")


def exception_text(e):
    from mlx_rl.data.rewards import exception_line

    return exception_line(e)


def call_env(spec, what, fn, turn, row, index, *args):
    try:
        return fn(*args)
    except MlxRlError:
        raise
    except Exception as e:  # the user's code: one line, never a traceback
        at = f"turn {turn}" if turn else "reset"
        raise EnvError(f"environment {spec.name}: {what} raised at {at} of {row_label(row, index)}: "
                       f"{exception_text(e)}") from None


def check_step_result(spec, result, turn, row, index):
    """(observation, reward, done) from env.step, checked; anything else is one line naming what came back."""
    shape = "expected (observation: str | None, reward: float, done: bool)"
    where = f"environment {spec.name}: step() at turn {turn} of {row_label(row, index)}"
    if not isinstance(result, tuple) or len(result) != 3:
        raise EnvError(f"{where} returned {type(result).__name__}{'' if not isinstance(result, tuple) else f' of {len(result)}'}; {shape}")
    obs, reward, done = result
    if obs is not None and not isinstance(obs, str):
        raise EnvError(f"{where} returned an observation of type {type(obs).__name__}; {shape}")
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise EnvError(f"{where} returned reward {reward!r}; {shape}, the reward finite")
    if not isinstance(done, (bool, np.bool_)):
        raise EnvError(f"{where} returned done={done!r}; {shape}")
    return obs, float(reward), bool(done)


def make_envs(spec, rows, seeds):
    """One environment per row, reset: (envs, first observations)."""
    envs, first = [], []
    for i, (row, seed) in enumerate(zip(rows, seeds)):
        env = call_env(spec, "make(row)", spec.make, 0, row, i, {**row, "episode_seed": int(seed)})
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise EnvError(f"environment {spec.name}: make(row) returned {type(env).__name__}, which has no "
                               f"{method}() method (an environment needs reset() -> str and step(text))")
        obs = call_env(spec, "reset()", env.reset, 0, row, i)
        if not isinstance(obs, str):
            raise EnvError(f"environment {spec.name}: reset() of {row_label(row, i)} returned "
                           f"{type(obs).__name__}, expected a str (the first observation; \"\" for none)")
        envs.append(env)
        first.append(obs)
    return envs, first


# --- how an observation becomes tokens ---------------------------------------------------------------


class ObservationFormat:
    """Tokens of an observation appended after a model turn.

    Without a chat template the observation's text is appended as it is. With one, it is a message of
    the environment's role rendered by the tokenizer's own template: the end of the assistant's message
    (what the template writes after its content; the part the model already wrote when its turn ended
    with EOS is left out), the observation as a message, then the generation prompt of the next
    assistant message. Those pieces are read off the template once, from a two-message conversation.
    """

    def __init__(self, tokenizer, chat_template, role="user"):
        self.tokenizer, self.chat = tokenizer, chat_template
        if not chat_template:
            return
        convo = [{"role": "user", "content": "PROMPT"}, {"role": "assistant", "content": "ANSWER"}]
        try:
            a = tokenizer.apply_chat_template(convo, tokenize=False)
            b = tokenizer.apply_chat_template(convo + [{"role": role, "content": "OBSERVATION"}], tokenize=False,
                                              add_generation_prompt=True)
        except Exception as e:
            raise MlxRlError(f"the chat template cannot write an observation as a '{role}' message: "
                             f"{exception_text(e)}") from None
        if not b.startswith(a) or "OBSERVATION" not in b[len(a):] or "ANSWER" not in a:
            raise MlxRlError(f"the chat template does not render a '{role}' message after the assistant's as a "
                             "continuation of the conversation, so observations can't be appended turn by turn")
        self.close = a[a.rindex("ANSWER") + len("ANSWER"):]  # e.g. "<|im_end|>\n"
        self.head, self.tail = b[len(a):].split("OBSERVATION", 1)

    def token_text(self, token):
        return str(self.tokenizer.convert_ids_to_tokens(int(token)))

    def end_of_turn(self):
        """The EOS id the template closes an assistant message with (the first of `close`), else the tokenizer's."""
        if self.chat:
            for t in sorted(self.tokenizer.eos_token_ids):
                if self.close.startswith(self.token_text(t)):
                    return t
        return self.tokenizer.eos_token_id

    def text(self, observation, last_token=None):
        """The observation's text after a turn whose last token is `last_token` (the EOS the model wrote, if any)."""
        if not self.chat:
            return observation
        close = self.close
        if last_token is not None and close.startswith(self.token_text(last_token)):
            close = close[len(self.token_text(last_token)):]  # the model wrote the end-of-message token itself
        return close + self.head + observation + self.tail

    def ids(self, observation, last_token=None):
        return list(self.tokenizer.encode(self.text(observation, last_token), add_special_tokens=False))


def episode_prompts(rows, first_obs, tokenizer, chat_template):
    """Prompt ids with the first observation: after the prompt's text, or inside its last user message."""
    if not chat_template and not any(isinstance(r.get("prompt"), list) for r in rows):
        ids = encode_prompts(tokenizer, rows, chat_template)
        return [p + (list(tokenizer.encode(o, add_special_tokens=False)) if o else []) for p, o in zip(ids, first_obs)]
    with_obs = []
    for row, obs in zip(rows, first_obs):
        prompt = row["prompt"]
        if obs:
            if isinstance(prompt, str):
                prompt = prompt + ("\n\n" if prompt else "") + obs
            else:
                prompt = [dict(m) for m in prompt]
                last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
                prompt[last]["content"] = prompt[last]["content"] + "\n\n" + obs
        with_obs.append({**row, "prompt": prompt})
    return encode_prompts(tokenizer, with_obs, chat_template=True)


def transcript_tokens(tokenizer, messages):
    """A chat transcript with tool (or user) messages between the assistant's, laid out as `play` lays out an
    episode: (ids, mask). The prompt is every message before the first assistant one (chat template, with the
    generation prompt); each assistant message is a model turn (its content, then EOS: mask 1); each other
    message after it an observation in its role (`ObservationFormat`: mask 0). A model fine-tuned on these
    sees in training exactly the token layout it will act in.
    """
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = encode_prompts(tokenizer, [{"prompt": [dict(m) for m in messages[:first]]}], chat_template=True)[0]
    mask = [0] * len(ids)
    formats = {}
    eos = ObservationFormat(tokenizer, True).end_of_turn()  # the token the template ends a message with
    for m in messages[first:]:
        if m["role"] == "assistant":
            turn = list(tokenizer.encode(m["content"], add_special_tokens=False)) + [eos]
            ids, mask = ids + turn, mask + [1] * len(turn)
        else:
            fmt = formats.setdefault(m["role"], ObservationFormat(tokenizer, True, m["role"]))
            obs = fmt.ids(m["content"], eos)
            ids, mask = ids + obs, mask + [0] * len(obs)
    return ids, mask


# --- the cache: columns each row really wrote, positions of the row's own transcript ---------------


class Layout:
    """Which cache columns hold a row's real tokens, shared by every layer's cache of one batch."""

    def __init__(self, batch):
        self.valid = np.zeros((batch, 0), dtype=bool)  # (B, C) columns so far
        self.position = np.zeros(batch, dtype=np.int64)  # (B,) the RoPE position of each row's next real token
        self.mask = None  # the attention mask of the chunk being run
        self.offset = None  # (B,) RoPE offset of the chunk's first column

    def begin(self, valid):
        """Prepare a model call on a chunk of N columns; valid (B, N) must be False-then-True in each row
        (left padding), so that a row's real tokens get consecutive positions."""
        B, N = valid.shape
        lead = N - valid.sum(axis=1)  # (B,) invalid columns before the row's first real one
        self.offset = mx.array((self.position - lead).astype(np.int32))
        C = self.valid.shape[1]
        self.valid = np.concatenate([self.valid, valid], axis=1)  # (B, C + N)
        cols = np.arange(C + N)
        causal = cols[None, :] <= (C + np.arange(N))[:, None]  # (N, C + N)
        # A column that holds no real token is seen by nobody but itself (never an all-masked row: no NaN).
        own = cols[None, :] == (C + np.arange(N))[:, None]
        mask = causal[None] & (self.valid[:, None, :] | own[None])  # (B, N, C + N)
        self.mask = mx.array(mask[:, None])  # (B, 1, N, C + N)
        self.position = self.position + valid.sum(axis=1)

    def repeat_rows(self, rows):
        self.valid, self.position = self.valid[rows], self.position[rows]


class RaggedKVCache:
    """One layer's KV cache for a batch whose rows write different columns (mlx-lm's cache protocol).

    Every model call appends N columns to every row; `Layout` says which of them are a row's real tokens.
    The buffer grows in steps of 256 columns.
    """

    step = 256

    def __init__(self, layout):
        self.layout = layout
        self.keys = self.values = None  # (B, H, capacity, D)
        self.length = 0

    @property
    def offset(self):
        return self.layout.offset

    def update_and_fetch(self, keys, values):
        B, H, N, D = keys.shape
        if self.keys is None or self.length + N > self.keys.shape[2]:
            grow = ((self.length + N - (0 if self.keys is None else self.keys.shape[2])) // self.step + 1) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            self.keys = new_k if self.keys is None else mx.concatenate([self.keys[:, :, : self.length], new_k], axis=2)
            self.values = new_v if self.values is None else mx.concatenate([self.values[:, :, : self.length], new_v], axis=2)
        self.keys[:, :, self.length : self.length + N] = keys
        self.values[:, :, self.length : self.length + N] = values
        self.length += N
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def make_mask(self, N, return_array=False, window_size=None):
        if window_size:
            raise MlxRlError("multi-turn episodes do not support sliding-window attention layers")
        return self.layout.mask

    def repeat_rows(self, rows):
        self.keys, self.values = self.keys[rows], self.values[rows]


def ragged_cache(model, batch):
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        raise MlxRlError("multi-turn episodes need a model whose layers all keep a plain KV cache (no sliding "
                         "window, no recurrent state)")
    layout = Layout(batch)
    return layout, [RaggedKVCache(layout) for _ in model.layers]


class Batch:
    """The model's side of a batch of episodes: the cache, the next-token logits, and every column written."""

    def __init__(self, model, prompt_ids, pad_id):
        self.model, self.pad_id = model, pad_id
        distinct, rows = distinct_rows(prompt_ids)
        longest = max(len(p) for p in distinct)
        tokens = np.full((len(distinct), longest), pad_id, dtype=np.int32)
        valid = np.zeros((len(distinct), longest), dtype=bool)
        for i, p in enumerate(distinct):
            tokens[i, longest - len(p):] = p
            valid[i, longest - len(p):] = True
        self.layout, self.cache = ragged_cache(model, len(distinct))
        logits = self.run(tokens, valid)  # (U, V) prefill once per distinct prompt
        if len(distinct) < len(prompt_ids):
            index = mx.array(rows)
            self.layout.repeat_rows(np.array(rows))
            for c in self.cache:
                c.repeat_rows(index)
            logits = logits[index]
        self.logits = logits  # (B, V) the distribution of each row's next token
        self.blocks = []  # (tokens, valid, is_model, logprobs) per call after the prefill, each (B, n)

    def run(self, tokens, valid):
        """One model call on a (B, N) chunk; returns the logits after each row's last column. (B, V)"""
        self.layout.begin(valid)
        return self.model(mx.array(tokens), cache=self.cache)[:, -1, :]

    def append(self, tokens, valid, is_model, logprobs=None):
        """Write a chunk and keep the logits of the rows that had a real token in it."""
        logits = self.run(tokens, valid)
        written = mx.array(valid.any(axis=1))[:, None]
        self.logits = mx.where(written, logits, self.logits)
        lp = np.zeros(tokens.shape, np.float32) if logprobs is None else logprobs
        self.blocks.append((tokens, valid, np.broadcast_to(is_model, tokens.shape), lp))

    def columns(self):
        """Each row's written columns, compacted in order: (ids, is_model, logprobs) (B, N), lengths (B,)."""
        tokens, valid, is_model, logprobs = (np.concatenate([b[i] for b in self.blocks], axis=1) for i in range(4))
        order = np.argsort(~valid, axis=1, kind="stable")  # real columns first, in their order
        lengths = valid.sum(axis=1)
        N = max(int(lengths.max()), 1)
        take = lambda x: np.take_along_axis(x, order, axis=1)[:, :N]  # noqa: E731
        keep = np.arange(N)[None, :] < lengths[:, None]  # (B, N)
        ids = np.where(keep, take(tokens), self.pad_id)
        return ids, take(is_model) & keep, np.where(keep, take(logprobs), 0.0), lengths, order


def stop_candidates(tokenizer, stops):
    """(V,) bool: the tokens whose text holds the last character of a stop string (only those can end one)."""
    cache = getattr(tokenizer, "_mlx_rl_stop_tables", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._mlx_rl_stop_tables = cache
        except AttributeError:
            pass
    lasts = frozenset(s[-1] for s in stops)
    if lasts not in cache:
        vocab = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else tokenizer.vocab_size
        table = np.zeros(max(vocab, tokenizer.vocab_size), dtype=bool)
        for i in range(len(table)):
            piece = tokenizer.decode([i])
            table[i] = any(c in piece for c in lasts)
        cache[lasts] = table
    return cache[lasts]


# --- the rollout ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class EpisodeStats:
    """Per-row outcomes of a batch of episodes (arrays of B)."""

    rewards: np.ndarray  # (B,) summed reward
    solved: np.ndarray  # (B,) 0/1 success
    turns: np.ndarray  # (B,) model turns taken
    truncated: np.ndarray  # (B,) 1 where --max-turns ended the episode
    turn_rewards: np.ndarray  # (B, N) each turn's reward at its last model token, in completion coordinates
    info: dict  # name -> (B,) the environments' own counters (tool_calls, tool_errors)
    transcripts: list  # (B,) lists of {"role": "model" | "env", "text": str}

    @classmethod
    def concat(cls, parts, N):
        """The stats of consecutive batches as one; turn_rewards right-padded to N columns."""
        cat = lambda get: np.concatenate([get(s) for s in parts])  # noqa: E731
        names = sorted({k for s in parts for k in s.info})  # a counter a batch never saw is 0 there, as in play()
        return cls(cat(lambda s: s.rewards), cat(lambda s: s.solved), cat(lambda s: s.turns), cat(lambda s: s.truncated),
                   cat(lambda s: np.pad(s.turn_rewards, ((0, 0), (0, N - s.turn_rewards.shape[1])))),
                   {k: cat(lambda s, k=k: s.info.get(k, np.zeros(len(s.rewards)))) for k in names},
                   [t for s in parts for t in s.transcripts])

    def scores(self):
        """The episodes as a `Scores`: total = the summed reward, per reward "success" (0/1)."""
        from mlx_rl.data.rewards import Scores

        return Scores(self.rewards.astype(np.float32), {"success": self.solved.astype(np.float64)}, ["success"],
                      [1.0], 0)

    def metrics(self, prefix="env"):
        out = {f"{prefix}/turns": float(self.turns.mean()), f"{prefix}/episode_reward": float(self.rewards.mean()),
               f"{prefix}/truncated_frac": float(self.truncated.mean())}
        out.update({f"{prefix}/{k}": float(np.mean(v)) for k, v in self.info.items()})
        return out


def transcript_text(segments, marks=("\u27e6", "\u27e7")):
    """A transcript as one string, the environment's turns marked: "<calc>3*4</calc>⟦12⟧12"."""
    return "".join(s["text"] if s["role"] == "model" else f"{marks[0]}{s['text']}{marks[1]}" for s in segments)


def play(model, tokenizer, rows, spec, temperature=1.0, top_p=1.0, chat_template=False, keys=None):
    """Play one episode per row (repeat rows for groups), batched. Returns a Rollout with `env_mask` and `episodes`.

    keys: (B, 2) one random key per row (`sampling.row_keys`); it also seeds each row's environment
    (row["episode_seed"], unless the row has one), so an episode does not depend on which other rows
    share its batch.
    """
    B = len(rows)
    if keys is None:  # greedy evaluation leaves the run's random stream alone
        keys = row_keys(B) if temperature > 0 else mx.random.split(mx.random.key(0), B)
    # each environment's seed: the row's own "episode_seed" (held-out rows carry one), else its random key
    seeds = [r.get("episode_seed", int(k[0])) for r, k in zip(rows, np.array(keys))]
    envs, first_obs = make_envs(spec, rows, seeds)
    prompt_ids = episode_prompts(rows, first_obs, tokenizer, chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = np.zeros(max(tokenizer.vocab_size, max(tokenizer.eos_token_ids) + 1), dtype=bool)
    eos[sorted(tokenizer.eos_token_ids)] = True
    stops = [list(getattr(env, "stop", None) or []) for env in envs]
    any_stop = sorted({s for row_stops in stops for s in row_stops if s})
    candidate = stop_candidates(tokenizer, any_stop) if any_stop else None
    formats = {}
    fmt = lambda env: formats.setdefault(getattr(env, "role", "user"), ObservationFormat(  # noqa: E731
        tokenizer, chat_template or any(isinstance(r.get("prompt"), list) for r in rows), getattr(env, "role", "user")))

    batch = Batch(model, prompt_ids, pad_id)
    done = np.zeros(B, dtype=bool)
    rewards, turns = np.zeros(B), np.zeros(B, dtype=np.int64)
    turn_reward_at = []  # (row, column index, reward)
    segments = [[{"role": "env", "text": o}] if o else [] for o in first_obs]
    keys = mx.array(keys)
    written = 0  # columns written after the prompt
    for turn in range(1, spec.max_turns + 1):
        in_turn = ~done  # (B,) rows sampling this turn
        turn_buf = np.zeros((B, spec.max_turn_tokens), dtype=np.int64)  # this turn's tokens, per row
        turn_len = np.zeros(B, dtype=np.int64)
        ended = np.full(B, "", dtype=object)  # why each row's turn ended: TURN_ENDS
        last_col = np.zeros(B, dtype=np.int64)  # the column of each row's last token of this turn
        for _ in range(spec.max_turn_tokens):
            logprobs = sampled_distribution(batch.logits, temperature, top_p)  # (B, V)
            if temperature > 0:
                split = _split_keys(keys)  # (B, 2, 2)
                token = _categorical(split[:, 0], logprobs).astype(mx.int32)  # (B,)
                # a row's key moves on only when it writes a token: its draws never depend on how long the
                # other rows' turns take (what keeps an episode the same in any batch, on any rank)
                keys = mx.where(mx.array(in_turn)[:, None], split[:, 1], keys)
            else:
                token = mx.argmax(logprobs, axis=-1).astype(mx.int32)
            token_lp = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]  # (B,)
            tok, lp = np.array(token), np.array(token_lp)  # the one sync per token
            writing = in_turn.copy()
            turn_buf[writing, turn_len[writing]] = tok[writing]
            turn_len += writing
            last_col[writing] = written
            hit_eos = writing & eos[np.minimum(tok, len(eos) - 1)]
            hit_stop = np.zeros(B, dtype=bool)
            if candidate is not None:  # decode only the rows whose new token could complete a stop string
                for b in np.flatnonzero(writing & ~hit_eos & candidate[np.minimum(tok, len(candidate) - 1)]):
                    text = tokenizer.decode(turn_buf[b, : turn_len[b]].tolist())
                    hit_stop[b] = any(s in text for s in stops[b])
            full = writing & (turn_len >= spec.max_turn_tokens) & ~hit_eos & ~hit_stop
            ended[hit_eos], ended[hit_stop & ~hit_eos], ended[full] = "eos", "stop", "length"
            in_turn = writing & ~(hit_eos | hit_stop | full)
            # every row's token goes through the model (the turn's last one too: the observation attends to it)
            batch.append(np.where(writing, tok, pad_id)[:, None].astype(np.int32), writing[:, None], True,
                         np.where(writing, lp, 0.0)[:, None].astype(np.float32))
            written += 1
            if not in_turn.any():
                break

        # the environments answer every row that took this turn
        obs_ids = [None] * B
        for b in np.flatnonzero(~done):
            ids = turn_buf[b, : turn_len[b] - (ended[b] == "eos")].tolist()  # the text without the EOS token
            text = tokenizer.decode(ids)
            if ended[b] == "stop":
                cut = min((text.index(s) + len(s) for s in stops[b] if s in text), default=len(text))
                text = text[:cut]
            segments[b].append({"role": "model", "text": text})
            turns[b] += 1
            result = call_env(spec, "step(text)", envs[b].step, turn, rows[b], b, text)
            obs, reward, finished = check_step_result(spec, result, turn, rows[b], b)
            rewards[b] += reward
            if reward:
                turn_reward_at.append((b, int(last_col[b]), reward))
            if finished:
                done[b] = True
            elif obs and turn < spec.max_turns:  # (after the last turn an observation would go unread)
                obs_ids[b] = fmt(envs[b]).ids(obs, turn_buf[b, turn_len[b] - 1] if ended[b] == "eos" else None)
                segments[b].append({"role": "env", "text": obs})
        if done.all() or turn == spec.max_turns:
            break
        if any(ids for ids in obs_ids):
            longest = max(len(ids) for ids in obs_ids if ids)
            tokens = np.full((B, longest), pad_id, dtype=np.int32)
            valid = np.zeros((B, longest), dtype=bool)
            for b, ids in enumerate(obs_ids):
                if ids:
                    tokens[b, longest - len(ids):] = ids
                    valid[b, longest - len(ids):] = True
            batch.append(tokens, valid, False)
            written += longest

    ids, is_model, logprobs, lengths, order = batch.columns()
    N = ids.shape[1]
    # each turn's reward at its last model token, mapped from batch columns to the row's own positions
    position_of = np.argsort(order, axis=1)  # (B, C): where each batch column landed in the row
    turn_rewards = np.zeros((B, N), dtype=np.float32)
    for b, col, reward in turn_reward_at:
        turn_rewards[b, position_of[b, col]] += reward
    solved = np.array([float(r >= 1.0 if getattr(env, "solved", None) is None else bool(env.solved))
                       for env, r in zip(envs, rewards)])
    info_keys = sorted({k for env in envs for k in (getattr(env, "info", None) or {})})
    info = {k: np.array([float((getattr(env, "info", None) or {}).get(k, 0.0)) for env in envs]) for k in info_keys}
    stats = EpisodeStats(rewards.astype(np.float64), solved, turns, (~done).astype(np.float64), turn_rewards, info,
                         segments)
    present = np.arange(N)[None, :] < lengths[:, None]
    rollout = Rollout(
        prompts=list(rows), prompt_ids=prompt_ids, completion_ids=mx.array(ids.astype(np.int32)),
        logprobs=mx.array(logprobs.astype(np.float32)), mask=mx.array(is_model.astype(np.float32)),
        finish_reasons=["done" if d else "max_turns" for d in done], texts=[transcript_text(s) for s in segments],
        env_mask=mx.array((present & ~is_model).astype(np.float32)), episodes=stats)
    return rollout
