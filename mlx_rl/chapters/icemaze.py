"""Ice Maze: the basics of RL on a gridworld, from tables to an MLX policy.

An agent must cross a frozen lake to a prize (G) without falling through the
holes (H). The board is small enough to see whole, so every RL term is a number
you can print: the *reward* of a step, the *return* of an episode (discounted
sum of rewards), the *value* V(s) of a square, the *Q-value* Q(s, a) of a move
from it, and the *advantage* A(s, a) = Q(s, a) - V(s) of that move over the
policy's usual choice. Three algorithms, each a few short functions:

  value_iteration  exact dynamic programming on the transition table: the optimal
                   V*, Q* and policy, the ground truth the learners are measured by.
  q_learning       tabular Q-learning: an epsilon-greedy *behaviour policy* collects
                   the data, the greedy *target policy* is what is learned.
  reinforce        policy gradient (REINFORCE with a learned value baseline) whose
                   policy is a small MLX network trained with nn.value_and_grad:
                   the same shape of update as the PPO and GRPO chapters, minus
                   the clipping and the KL.

The environment is FrozenLake's (same maps, action order LEFT, DOWN, RIGHT, UP,
same slippery dynamics), so results compare with that well-known benchmark.

Deliberate simplifications:
- The environment is a tiny class over a table `P[s][a] = [(prob, next, reward,
  terminated)]`, as in Gym's FrozenLake, not a Gym environment.
- Q-learning's step size falls linearly from --alpha to --alpha-end, and epsilon follows a linear schedule.
- REINFORCE drops the gamma^t factor of the policy-gradient theorem (as nearly
  every implementation does), and rolls out a whole batch of episodes with the
  policy table computed once, since the policy only changes between updates.
- The value baseline shares the policy's hidden layer (one network, two heads).

References: Sutton & Barto, Reinforcement Learning: An Introduction (2nd ed.),
chapters 3-4 (values, value iteration), 6.5 (Q-learning), 13.4 (REINFORCE with
baseline); Watkins & Dayan 1992 (Q-learning); Williams 1992 (REINFORCE).
"""

import dataclasses
import math
import time
import typing
from collections import deque
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_rl.config import MlxRlError, command, log_to_option, option
from mlx_rl.engine.live import LiveLine, fmt_duration
from mlx_rl.runs import Run, atomic_write_json, check_out_dir


# --- config --------------------------------------------------------------------

ALGOS = ["q_learning", "reinforce", "value_iteration"]

# Training episodes when --episodes is not given: (algo, board, slippery) -> episodes.
# Chosen so that each default run reaches the chapter's targets in under a minute on
# a 2-core CPU; other boards (random, files) use the 8x8 figures.
DEFAULT_EPISODES = {
    ("q_learning", "4x4", False): 2_000,
    ("q_learning", "8x8", False): 10_000,
    ("q_learning", "4x4", True): 40_000,
    ("q_learning", "8x8", True): 80_000,
    ("reinforce", "4x4", False): 10_000,
    ("reinforce", "8x8", False): 40_000,
    ("reinforce", "4x4", True): 100_000,
    ("reinforce", "8x8", True): 60_000,
}


def default_episodes_help():
    """DEFAULT_EPISODES as --help shows it: 'q_learning 4x4 2000, 4x4 slippery 40000, ...'."""
    parts = [f"{algo} {board}{' slippery' if slip else ''} {n}" for (algo, board, slip), n in DEFAULT_EPISODES.items()]
    return ", ".join(parts)


@dataclasses.dataclass
class IceMazeConfig:
    out: typing.Optional[str] = option(None, "where to write: the run directory (default: runs/icemaze-<date>-<time>)")
    log_to: typing.Tuple[str, ...] = log_to_option()
    seed: int = option(0, "random seed for random maps, exploration, initialisation and evaluation")
    map: str = option(
        "4x4",
        "the board: 4x4 or 8x8 (FrozenLake's maps), random:N or random:RxC (a seeded, solvable map), "
        "a map file, or rows like SFFF/FHFH/FFFH/HFFG",
    )
    slippery: bool = option(False, "slippery ice: the intended move with probability 1/3, each perpendicular move 1/3")
    step_penalty: float = option(0.0, "reward subtracted on every step, to teach 'fewest steps'", min=0.0)
    hole_prob: float = option(0.2, "random maps: chance that a square is a hole", min=0.0, max=0.8)
    max_steps: typing.Optional[int] = option(None, "step limit per episode (default: 100 on 4x4 and smaller, else 200, as FrozenLake)", min=1)
    algo: str = option("q_learning", "algorithm", choices=ALGOS)
    episodes: typing.Optional[int] = option(None, "training episodes (default, by algorithm and board: "
                                            f"{default_episodes_help()}; a board of up to 16 squares as 4x4, a larger one as 8x8)", min=1)
    gamma: float = option(0.99, "discount factor: return = r_1 + gamma r_2 + gamma^2 r_3 + ...", above=0.0, max=1.0)
    alpha: float = option(0.1, "q_learning: step size of the TD update at the start", above=0.0, max=1.0)
    alpha_end: float = option(0.01, "q_learning: step size at the end (falls linearly over the run, which steadies Q)", above=0.0, max=1.0)
    epsilon_start: float = option(1.0, "q_learning: exploration rate of the behaviour policy at the start", min=0.0, max=1.0)
    epsilon_end: float = option(0.05, "q_learning: exploration rate after the decay", min=0.0, max=1.0)
    epsilon_decay: float = option(0.5, "q_learning: share of the episodes over which epsilon falls linearly", above=0.0, max=1.0)
    lr: float = option(0.01, "reinforce: learning rate (Adam)", above=0.0)
    batch_episodes: int = option(100, "reinforce: episodes per policy update", min=1)
    hidden: int = option(64, "reinforce: hidden units of the policy network (0: a table of logits)", min=0)
    value_coef: float = option(0.5, "reinforce: weight of the baseline's squared error in the loss", min=0.0)
    entropy_coef: float = option(0.01, "reinforce: weight of the entropy bonus", min=0.0)
    vi_tol: float = option(1e-10, "value_iteration: stop when no value changes by more than this", above=0.0)
    eval_episodes: int = option(2000, "greedy evaluation episodes for the learned and the optimal policy", min=1)
    log_every: typing.Optional[int] = option(None, "write one metrics row per this many episodes, averaged (default: at most 1000 rows)", min=1)
    plots: bool = option(True, "draw PNGs into RUN/plots")

    def validate(self):
        if self.epsilon_end > self.epsilon_start:
            raise MlxRlError("--epsilon-end must not exceed --epsilon-start")


# --- the environment ------------------------------------------------------------

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3  # FrozenLake's action order
ACTION_NAMES = ["left", "down", "right", "up"]
ARROWS = "\u2190\u2193\u2192\u2191"  # ← ↓ → ↑
MOVES = {LEFT: (0, -1), DOWN: (1, 0), RIGHT: (0, 1), UP: (-1, 0)}  # (row, col) deltas

MAPS = {
    "4x4": ["SFFF", "FHFH", "FFFH", "HFFG"],
    "8x8": [
        "SFFFFFFF",
        "FFFFFFFF",
        "FFFHFFFF",
        "FFFFFHFF",
        "FFFHFFFF",
        "FHHFFFHF",
        "FHFFHFHF",
        "FFFHFFFG",
    ],
}
TILES = "SFHG"  # start, frozen ice, hole, goal


def parse_map(text):
    """Rows of S/F/H/G separated by newlines, '/' or ',' -> list of row strings; checked."""
    rows = [r.strip() for r in text.replace("/", "\n").replace(",", "\n").splitlines() if r.strip()]
    if not rows:
        raise MlxRlError("the map is empty")
    bad = sorted(set("".join(rows)) - set(TILES))
    if bad:
        raise MlxRlError(f"the map has unknown tiles {''.join(bad)!r}: use S (start), F (ice), H (hole), G (goal)")
    if len({len(r) for r in rows}) > 1:
        raise MlxRlError(f"the map's rows have different lengths ({', '.join(str(len(r)) for r in rows)})")
    n_start, n_goal = "".join(rows).count("S"), "".join(rows).count("G")
    if n_start != 1:
        raise MlxRlError(f"the map needs exactly one start S, it has {n_start}")
    if n_goal < 1:
        raise MlxRlError("the map has no goal G")
    if min_steps(rows) is None:
        raise MlxRlError("the map is unsolvable: no path over the ice leads from S to G")
    return rows


def min_steps(rows):
    """Fewest moves from S to a G without stepping in a hole (breadth-first search); None if none."""
    n_rows, n_cols = len(rows), len(rows[0])
    start = next((r, c) for r in range(n_rows) for c in range(n_cols) if rows[r][c] == "S")
    dist = {start: 0}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if rows[r][c] == "G":
            return dist[(r, c)]
        for dr, dc in MOVES.values():
            nxt = (min(max(r + dr, 0), n_rows - 1), min(max(c + dc, 0), n_cols - 1))
            if nxt not in dist and rows[nxt[0]][nxt[1]] != "H":
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    return None


def random_map(n_rows, n_cols, rng, hole_prob=0.2):
    """A random board with S top-left and G bottom-right, redrawn until it is solvable."""
    for _ in range(10_000):
        holes = rng.random((n_rows, n_cols)) < hole_prob
        rows = ["".join("H" if holes[r, c] else "F" for c in range(n_cols)) for r in range(n_rows)]
        rows[0] = "S" + rows[0][1:]
        rows[-1] = rows[-1][:-1] + "G"
        if min_steps(rows) is not None:
            return rows
    raise MlxRlError(f"no solvable {n_rows}x{n_cols} map found with --hole-prob {hole_prob}: lower it")


def load_map(spec, seed=0, hole_prob=0.2):
    """--map value -> rows. See IceMazeConfig.map for the accepted forms."""
    if spec in MAPS:
        return list(MAPS[spec])
    if spec.startswith("random:"):
        size = spec[len("random:"):].lower().split("x")
        if not (1 <= len(size) <= 2 and all(s.isdigit() and 2 <= int(s) <= 64 for s in size)):
            raise MlxRlError(f"bad random map size {spec!r}: use random:N or random:RxC with sides 2 to 64")
        n_rows, n_cols = int(size[0]), int(size[-1])
        return random_map(n_rows, n_cols, np.random.default_rng(seed), hole_prob)
    path = Path(spec)
    if path.is_file():
        return parse_map(path.read_text())
    if any(sep in spec for sep in "/,\n") or set(spec) <= set(TILES):
        return parse_map(spec)  # rows written out: SFFF/FHFH/FFFH/HFFG
    raise MlxRlError(f"unknown map {spec!r}: use 4x4, 8x8, random:N, random:RxC, a map file, or rows like SFFF/FHFH/FFFH/HFFG")


class IceMaze:
    """The frozen lake. States are squares numbered row by row: s = row * n_cols + col.

    `P[s][a]` lists the outcomes of action a in state s as (prob, next_state,
    reward, terminated), FrozenLake's own format. Holes and the goal are
    terminal: the episode ends on entering them.
    """

    def __init__(self, rows, slippery=False, step_penalty=0.0, max_steps=None):
        self.rows = list(rows)
        self.n_rows, self.n_cols = len(rows), len(rows[0])
        self.n_states, self.n_actions = self.n_rows * self.n_cols, 4
        self.slippery, self.step_penalty = slippery, step_penalty
        self.max_steps = max_steps or (100 if self.n_states <= 16 else 200)
        self.tiles = "".join(rows)
        self.start = self.tiles.index("S")
        self.terminal = np.array([t in "HG" for t in self.tiles])  # (S,)
        self.P = [[self.outcomes(s, a) for a in range(4)] for s in range(self.n_states)]

    def move(self, s, a):
        """Where action a leads from s on solid ice: a move into the edge stays put."""
        r, c = divmod(s, self.n_cols)
        dr, dc = MOVES[a]
        r, c = min(max(r + dr, 0), self.n_rows - 1), min(max(c + dc, 0), self.n_cols - 1)
        return r * self.n_cols + c

    def outcomes(self, s, a):
        if self.terminal[s]:
            return [(1.0, s, 0.0, True)]  # absorbing: nothing more happens (never reached by step())
        # Slippery ice: the intended move, or either perpendicular one, each with probability 1/3.
        actions = [(a - 1) % 4, a, (a + 1) % 4] if self.slippery else [a]
        merged = {}
        for b in actions:
            s2 = self.move(s, b)
            merged[s2] = merged.get(s2, 0.0) + 1.0 / len(actions)
        return [(p, s2, self.reward(s2), bool(self.terminal[s2])) for s2, p in merged.items()]

    def reward(self, s2):
        """+1 for reaching the goal, minus the step penalty on every step."""
        return (1.0 if self.tiles[s2] == "G" else 0.0) - self.step_penalty

    def step(self, s, a, rng):
        """One move: (next_state, reward, terminated). Truncation at max_steps is the loop's job."""
        outcomes = self.P[s][a]
        u, acc = rng.random(), 0.0
        for p, s2, r, terminated in outcomes:
            acc += p
            if u < acc:
                return s2, r, terminated
        return outcomes[-1][1:]

    def tables(self):
        """Dense transition table: P (S, A, S) probabilities, R (S, A, S) rewards, terminal (S,)."""
        S, A = self.n_states, self.n_actions
        P, R = np.zeros((S, A, S)), np.zeros((S, A, S))
        for s in range(S):
            for a in range(A):
                for p, s2, r, _ in self.P[s][a]:
                    P[s, a, s2] += p
                    R[s, a, s2] = r
        return P, R, self.terminal.copy()

    def render(self, state=None, policy=None):
        """The board as text; `policy` (S,) actions draws arrows on the ice, `state` marks the agent."""
        lines = []
        for r in range(self.n_rows):
            cells = []
            for c in range(self.n_cols):
                s = r * self.n_cols + c
                tile = self.tiles[s]
                if s == state:
                    tile = "@"
                elif policy is not None and tile in "SF":
                    tile = ARROWS[policy[s]]
                cells.append(tile)
            lines.append(" ".join(cells))
        return "\n".join(lines)


def make_env(cfg):
    rows = load_map(cfg.map, cfg.seed, cfg.hole_prob)
    return IceMaze(rows, cfg.slippery, cfg.step_penalty, cfg.max_steps)


# --- the maths: returns, values, advantages ----------------------------------------


def discounted_returns(rewards, mask, gamma):
    """G_t = r_{t+1} + gamma G_{t+1}, backwards over each episode. rewards, mask: (B, T)."""
    returns = np.zeros_like(rewards, dtype=np.float64)  # (B, T)
    running = np.zeros(rewards.shape[0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running * mask[:, t]
    return returns


def bellman_q(P, R, terminal, V, gamma):
    """Q(s, a) = sum_s' P(s'|s,a) [R(s,a,s') + gamma V(s')], with V = 0 past the end. (S, A)."""
    return np.einsum("sax,sax->sa", P, R + gamma * np.where(terminal, 0.0, V)[None, None, :])


def value_iteration(P, R, terminal, gamma, tol=1e-10, max_sweeps=100_000):
    """Optimal values by repeated Bellman optimality backups: V(s) <- max_a Q(s, a).

    Returns V (S,), Q (S, A), the greedy policy (S,) and the max change of each sweep.
    """
    V = np.zeros(P.shape[0])
    deltas = []
    for _ in range(max_sweeps):
        Q = bellman_q(P, R, terminal, V, gamma)  # (S, A)
        V_new = np.where(terminal, 0.0, Q.max(axis=1))  # (S,)
        deltas.append(float(np.abs(V_new - V).max()))
        V = V_new
        if deltas[-1] < tol:
            break
    Q = bellman_q(P, R, terminal, V, gamma)
    return V, Q, greedy(Q), deltas


def policy_values(P, R, terminal, policy_probs, gamma):
    """V^pi (S,) of a stochastic policy (S, A) by solving the linear Bellman equations."""
    S = P.shape[0]
    P_pi = np.einsum("sa,sax->sx", policy_probs, P) * ~terminal[:, None]  # (S, S), no moves out of the end
    r_pi = np.einsum("sa,sax,sax->s", policy_probs, P, R) * ~terminal  # (S,)
    return np.linalg.solve(np.eye(S) - gamma * P_pi + 1e-12 * np.eye(S), r_pi)


def success_probability(env, policy_probs):
    """Exact chance that the policy reaches a goal within env.max_steps (finite-horizon DP)."""
    P, _, terminal = env.tables()
    goal = np.array([t == "G" for t in env.tiles])
    win = goal.astype(np.float64)  # (S,) chance of success with k steps left, k = 0
    P_pi = np.einsum("sa,sax->sx", policy_probs, P)  # (S, S)
    for _ in range(env.max_steps):
        win = np.where(terminal, goal, P_pi @ win)
    return float(win[env.start])


def greedy(Q):
    """The target policy: argmax_a Q(s, a), first action on ties. (S, A) -> (S,)."""
    return Q.argmax(axis=1)


def advantages_of(Q):
    """A(s, a) = Q(s, a) - V(s) with V(s) = max_a Q(s, a): 0 for the greedy move, < 0 otherwise."""
    return Q - Q.max(axis=1, keepdims=True)


def one_hot_policy(actions, n_actions=4):
    return np.eye(n_actions)[actions]  # (S,) -> (S, A)


# --- rollouts -----------------------------------------------------------------------


@dataclasses.dataclass
class Episodes:
    """A batch of episodes, padded to the longest: (B, T) arrays with mask 1 on real steps."""

    states: np.ndarray  # (B, T) state before each move
    actions: np.ndarray  # (B, T)
    rewards: np.ndarray  # (B, T) reward of each move
    mask: np.ndarray  # (B, T)
    lengths: np.ndarray  # (B,)
    success: np.ndarray  # (B,) reached a goal


def rollout(env, policy_probs, n_episodes, rng):
    """Run n_episodes at once with a fixed policy table (S, A), sampling from the transition table.

    Every episode draws its random numbers at the same positions whatever the
    policy, so two policies rolled out from the same seed share their luck on the
    ice (common random numbers), which makes their success rates comparable.
    """
    P, R, terminal = env.tables()
    cum_policy = np.cumsum(policy_probs, axis=1)  # (S, A)
    cum_policy /= cum_policy[:, -1:]  # exactly 1 at the end, whatever the rounding
    cum_P = np.cumsum(P, axis=2)  # (S, A, S)
    cum_P /= cum_P[:, :, -1:]
    B, T = n_episodes, env.max_steps
    states = np.zeros((B, T), dtype=np.int64)
    actions = np.zeros((B, T), dtype=np.int64)
    rewards = np.zeros((B, T))
    mask = np.zeros((B, T))
    s = np.full(B, env.start)
    alive = np.ones(B, dtype=bool)
    for t in range(T):
        u_action, u_move = rng.random(B), rng.random(B)
        if not alive.any():
            break
        a = np.minimum((cum_policy[s] < u_action[:, None]).sum(axis=1), env.n_actions - 1)  # (B,)
        s2 = np.minimum((cum_P[s, a] < u_move[:, None]).sum(axis=1), env.n_states - 1)  # (B,)
        states[:, t], actions[:, t], mask[:, t] = s, a, alive
        rewards[:, t] = R[s, a, s2] * alive
        alive = alive & ~terminal[s2]
        s = np.where(mask[:, t] > 0, s2, s)
    lengths = mask.sum(axis=1).astype(np.int64)
    T_used = max(int(lengths.max()), 1)
    success = np.array([env.tiles[x] == "G" for x in s])
    return Episodes(states[:, :T_used], actions[:, :T_used], rewards[:, :T_used], mask[:, :T_used], lengths, success)


def evaluate(env, policy, n_episodes, seed, gamma):
    """Greedy evaluation of a deterministic policy (S,) over n_episodes: success rate and lengths."""
    eps = rollout(env, one_hot_policy(policy), n_episodes, np.random.default_rng(seed))
    returns = discounted_returns(eps.rewards, eps.mask, gamma)[:, 0]
    won = eps.lengths[eps.success]
    return {
        "success_rate": float(eps.success.mean()),
        "return": float(returns.mean()),
        "mean_length": float(eps.lengths.mean()),
        "success_min_length": int(won.min()) if len(won) else None,
        "success_max_length": int(won.max()) if len(won) else None,
        "success_probability": success_probability(env, one_hot_policy(policy)),
    }


# --- tabular Q-learning -------------------------------------------------------------


def epsilon_greedy(q, epsilon, rng):
    """The behaviour policy: a random move with chance epsilon, else a greedy one (ties at random)."""
    if rng.random() < epsilon:
        return int(rng.random() * 4)
    best = max(q)
    ties = [a for a in range(4) if q[a] == best]
    return ties[0] if len(ties) == 1 else ties[int(rng.random() * len(ties))]


def schedules(episode, cfg, episodes):
    """(epsilon, alpha) for an episode: epsilon falls over the first epsilon_decay of the run, alpha over all of it."""
    frac = min(episode / max(cfg.epsilon_decay * episodes, 1.0), 1.0)
    epsilon = cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)
    alpha = cfg.alpha + episode / episodes * (cfg.alpha_end - cfg.alpha)
    return epsilon, alpha


def q_learning_episode(env, Q, epsilon, alpha, gamma, rng):
    """Play one episode with the behaviour policy, updating Q towards the greedy target in place.

    Q is a list of S rows of 4 floats (plain Python lists: about 3x faster than
    numpy for one number at a time). TD target: r + gamma max_a' Q(s', a'), or
    just r when the episode terminated (a hole or the goal). Hitting the step
    limit is a truncation, not an ending: the target still bootstraps from Q(s', .).
    """
    s, ret, discount, td_abs, adv = env.start, 0.0, 1.0, 0.0, 0.0
    for t in range(env.max_steps):
        a = epsilon_greedy(Q[s], epsilon, rng)
        adv += Q[s][a] - max(Q[s])  # advantage A(s, a) = Q(s, a) - V(s) of the move taken: < 0 when exploring
        s2, r, terminated = env.step(s, a, rng)
        target = r if terminated else r + gamma * max(Q[s2])
        td_error = target - Q[s][a]
        Q[s][a] += alpha * td_error
        ret += discount * r
        discount *= gamma
        td_abs += abs(td_error)
        s = s2
        if terminated:
            break
    n = t + 1
    return {"return": ret, "length": n, "success": float(env.tiles[s] == "G"), "td_error": td_abs / n, "advantage": adv / n}


# --- REINFORCE with an MLX policy ---------------------------------------------------


class PolicyNet(nn.Module):
    """One-hot state -> (logits over the 4 moves, baseline value). hidden=0: a table of logits."""

    def __init__(self, n_states, n_actions=4, hidden=64):
        super().__init__()
        self.hidden = nn.Linear(n_states, hidden) if hidden else None
        width = hidden or n_states
        self.policy_head = nn.Linear(width, n_actions)
        self.value_head = nn.Linear(width, 1)

    def __call__(self, x):  # x: (..., S) one-hot
        h = mx.tanh(self.hidden(x)) if self.hidden is not None else x
        return self.policy_head(h), self.value_head(h).squeeze(-1)  # (..., A), (...)


def reinforce_loss(model, states_1h, actions, returns, mask, value_coef, entropy_coef):
    """REINFORCE with a baseline: -E[log pi(a|s) (G - V(s))] + value_coef (G - V)^2 - entropy_coef H.

    states_1h (B, T, S); actions, returns, mask (B, T). Every term is a mean over
    the batch's real steps (mask 1), as in the LLM chapters' masked token mean, so
    the entropy bonus weighs the same against the policy term however long the
    episodes are. (The textbook sums over an episode's steps instead: the same
    direction, scaled by episode length.)
    """
    n = mask.sum()
    logits, values = model(states_1h)  # (B, T, A), (B, T)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (B, T, A)
    logprob_taken = mx.take_along_axis(logprobs, actions[..., None], axis=-1).squeeze(-1)  # (B, T)
    advantages = mx.stop_gradient(returns - values)  # (B, T) how much better than the baseline
    policy_loss = -(logprob_taken * advantages * mask).sum() / n
    value_loss = 0.5 * (((returns - values) ** 2) * mask).sum() / n
    entropy = -(mx.exp(logprobs) * logprobs).sum(axis=-1)  # (B, T)
    entropy = (entropy * mask).sum() / n
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
    metrics = {"loss/policy": policy_loss, "loss/value": value_loss, "policy/entropy": entropy,
               "value/advantage_mean": (advantages * mask).sum() / mask.sum()}
    return loss, metrics


def policy_table(model, n_states):
    """pi(a|s) for every state, (S, A), and the baseline V(s), (S,), as numpy."""
    logits, values = model(mx.eye(n_states))
    probs = mx.softmax(logits, axis=-1)
    mx.eval(probs, values)
    return np.array(probs, dtype=np.float64), np.array(values, dtype=np.float64)


# --- training -----------------------------------------------------------------------


def board_name(cfg, env):
    return cfg.map if cfg.map in MAPS else ("4x4" if env.n_states <= 16 else "8x8")


class Logger:
    """Averages per-episode figures over `every` episodes and writes one metrics row."""

    def __init__(self, run, every):
        self.run, self.every, self.rows, self.sums, self.count = run, every, [], {}, 0

    def add(self, episode, figures, n=1):
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.count += n
        if self.count >= self.every:
            self.flush(episode)

    def flush(self, episode):
        if self.count:
            row = {k: v / self.count for k, v in self.sums.items()}
            self.rows.append(self.run.log(episode, row))
            self.sums, self.count = {}, 0


def train_q_learning(cfg, env, episodes, rng, logger):
    Q = [[0.0] * env.n_actions for _ in range(env.n_states)]  # Q[s][a], all zero at the start
    start_s = env.start
    progress = LiveLine("icemaze q_learning", episodes, signals={"success": "env/success", "epsilon": "policy/epsilon"})
    start = time.perf_counter()
    for episode in range(1, episodes + 1):
        epsilon, alpha = schedules(episode - 1, cfg, episodes)
        ep = q_learning_episode(env, Q, epsilon, alpha, cfg.gamma, rng)
        logger.add(episode, {
            "env/return": ep["return"], "env/length": ep["length"], "env/success": ep["success"],
            "policy/epsilon": epsilon, "optim/alpha": alpha, "loss/td_error": ep["td_error"], "value/advantage_taken": ep["advantage"],
            "value/v_start": max(Q[start_s]),  # V(s) = max_a Q(s, a): the value of the greedy target policy
        })
        if episode % logger.every == 0:
            progress.update(episode, logger.rows[-1])
    progress.close()
    logger.flush(episodes)
    Q = np.array(Q)  # (S, A)
    return {"Q": Q, "V": Q.max(axis=1), "policy": greedy(Q), "train_s": time.perf_counter() - start}


def train_reinforce(cfg, env, episodes, rng, logger):
    mx.random.seed(cfg.seed)
    model = PolicyNet(env.n_states, env.n_actions, cfg.hidden)
    optimizer = optim.Adam(learning_rate=cfg.lr)
    value_and_grad = nn.value_and_grad(model, lambda *a: reinforce_loss(model, *a))
    eye = mx.eye(env.n_states)
    updates = math.ceil(episodes / cfg.batch_episodes)
    progress = LiveLine("icemaze reinforce", updates, signals={"success": "env/success", "loss": "loss/policy"})
    start, done = time.perf_counter(), 0
    for update in range(1, updates + 1):
        n = min(cfg.batch_episodes, episodes - done)
        # Rollout: the behaviour policy is the current stochastic policy itself (on-policy).
        probs, _ = policy_table(model, env.n_states)
        eps = rollout(env, probs, n, rng)
        returns = discounted_returns(eps.rewards, eps.mask, cfg.gamma)  # (B, T)
        # Update: one gradient step on the batch.
        batch = (eye[mx.array(eps.states)], mx.array(eps.actions), mx.array(returns, dtype=mx.float32),
                 mx.array(eps.mask, dtype=mx.float32), cfg.value_coef, cfg.entropy_coef)
        (loss, metrics), grads = value_and_grad(*batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, metrics)
        done += n
        figures = {"env/return": returns[:, 0].mean(), "env/length": eps.lengths.mean(),
                   "env/success": eps.success.mean(), **{k: v.item() for k, v in metrics.items()}}
        logger.add(done, figures, n)
        if update % max(1, updates // 50) == 0 or update == updates:
            progress.update(update, {"env/success": float(eps.success.mean()), "loss/policy": loss.item()})
    progress.close()
    logger.flush(episodes)
    probs, V = policy_table(model, env.n_states)
    # Q^pi and A^pi = Q^pi - V^pi of the learned stochastic policy, exactly, from the table.
    P, R, terminal = env.tables()
    V_pi = policy_values(P, R, terminal, probs, cfg.gamma)
    Q = bellman_q(P, R, terminal, V_pi, cfg.gamma)
    return {"Q": Q, "V": np.where(env.terminal, 0.0, V), "A": Q - V_pi[:, None], "policy": probs.argmax(axis=1), "probs": probs,
            "train_s": time.perf_counter() - start, "model": model}


def train(cfg):
    from mlx_rl.engine import speed
    from mlx_rl.engine.loop import summary_dict

    env = make_env(cfg)
    board = board_name(cfg, env)
    if cfg.out is not None:
        check_out_dir(cfg.out)
    run = Run.create("icemaze", cfg, speed.runtime())
    episodes = cfg.episodes or DEFAULT_EPISODES.get((cfg.algo, board, cfg.slippery), 1)
    print(f"icemaze: {cfg.algo} on {cfg.map} ({env.n_rows}x{env.n_cols}, {'slippery' if cfg.slippery else 'deterministic'})"
          f", {episodes if cfg.algo != 'value_iteration' else 0} episodes -> {run.path}")
    print(env.render())

    # Ground truth: value iteration on the transition table.
    P, R, terminal = env.tables()
    vi_start = time.perf_counter()
    V_star, Q_star, pi_star, deltas = value_iteration(P, R, terminal, cfg.gamma, cfg.vi_tol)
    vi_s = time.perf_counter() - vi_start

    rng = np.random.default_rng(cfg.seed)
    every = cfg.log_every or max(1, episodes // 1000)
    logger = Logger(run, every)
    if cfg.algo == "q_learning":
        learned = train_q_learning(cfg, env, episodes, rng, logger)
    elif cfg.algo == "reinforce":
        learned = train_reinforce(cfg, env, episodes, rng, logger)
    else:
        for sweep, delta in enumerate(deltas, 1):
            run.log(sweep, {"loss/bellman_error": delta, "time/value_iteration_s": vi_s / len(deltas)})
        learned = {"Q": Q_star, "V": V_star, "policy": pi_star, "train_s": vi_s}

    # Evaluate the learned greedy policy and the optimal one on the same episodes (same seed).
    eval_seed = cfg.seed + 1_000_003
    ev = evaluate(env, learned["policy"], cfg.eval_episodes, eval_seed, cfg.gamma)
    ev_star = evaluate(env, pi_star, cfg.eval_episodes, eval_seed, cfg.gamma)
    shortest = min_steps(env.rows)
    all_shortest = ev["success_rate"] == 1.0 and ev["success_max_length"] == shortest
    atomic_write_json(run.path / "tables.json", {
        "map": env.rows, "actions": ACTION_NAMES, "Q": learned["Q"].tolist(), "V": learned["V"].tolist(),
        "advantage": learned.get("A", advantages_of(learned["Q"])).tolist(), "policy": learned["policy"].tolist(),
        "V_star": V_star.tolist(), "Q_star": Q_star.tolist(), "policy_star": pi_star.tolist(),
    })
    if cfg.plots:
        plot_run(run, env, learned, V_star, pi_star, logger.rows, cfg)
    n_episodes = episodes if cfg.algo != "value_iteration" else 0
    details = {
        "algo": cfg.algo, "map": env.rows, "slippery": cfg.slippery, "episodes": n_episodes,
        "train_s": round(learned["train_s"], 2), "min_steps": shortest, "eval": ev,
        "value_iteration": {**ev_star, "v_start": float(V_star[env.start]), "sweeps": len(deltas)},
        "success_gap": round(abs(ev["success_rate"] - ev_star["success_rate"]), 4),
        "shortest_path_every_episode": bool(all_shortest), "eval_episodes": cfg.eval_episodes,
    }
    before = {"eval/success_rate_optimal": ev_star["success_rate"]}  # the optimal policy: what "after" aims at
    after = {"eval/success_rate": ev["success_rate"]}
    final = {k: v for k, v in (logger.rows[-1] if logger.rows else {}).items() if k not in ("step", "wall_s")}
    summary = run.write_summary(summary_dict("icemaze", n_episodes or len(deltas), run.wall_s, before, after, final,
                                             {"train": round(learned["train_s"], 3)}, None, run.path, details))
    print("greedy policy:")
    print(env.render(policy=learned["policy"]))
    print(f"icemaze: greedy success rate {ev['success_rate']:.1%} (optimal {ev_star['success_rate']:.1%}) over "
          f"{cfg.eval_episodes} episodes; shortest path {shortest} steps, learned {ev['success_min_length']}-"
          f"{ev['success_max_length']} in {fmt_duration(summary['wall_s'])}; run in {run.path}")
    return summary


# --- pictures -------------------------------------------------------------------------


def draw_board(ax, env, V, policy, title):
    """Heat map of V with the policy's arrows on the ice, holes in black, S and G marked."""
    from matplotlib.patches import Rectangle

    grid = V.reshape(env.n_rows, env.n_cols)
    ax.imshow(grid, cmap="viridis", vmin=min(0.0, V.min()), vmax=max(V.max(), 1e-9))
    dx = {LEFT: (-0.3, 0), DOWN: (0, 0.3), RIGHT: (0.3, 0), UP: (0, -0.3)}
    for s, tile in enumerate(env.tiles):
        r, c = divmod(s, env.n_cols)
        if tile == "H":
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, color="black"))
            continue
        if tile == "G":
            ax.text(c, r, "G", ha="center", va="center", color="red", fontsize=14, weight="bold")
            continue
        u, v = dx[int(policy[s])]
        ax.arrow(c - u / 2, r - v / 2, u, v, head_width=0.18, head_length=0.15, color="white", length_includes_head=True)
        if tile == "S":
            ax.text(c - 0.35, r - 0.3, "S", color="orange", fontsize=9, weight="bold")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def plot_run(run, env, learned, V_star, pi_star, rows, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = f"{cfg.algo} on {cfg.map}{' (slippery)' if cfg.slippery else ''}"
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    draw_board(ax, env, learned["V"], learned["policy"], f"{name}: greedy policy over V")
    fig.colorbar(ax.images[0], ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(run.plots_dir / "policy.png", dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    draw_board(axes[0], env, learned["V"], learned["policy"], f"learned V ({cfg.algo})")
    draw_board(axes[1], env, V_star, pi_star, "value iteration V*")
    ice = ~env.terminal
    axes[2].scatter(V_star[ice], learned["V"][ice], s=14)
    lim = [min(0, V_star.min()), max(V_star.max(), learned["V"].max(), 1e-9)]
    axes[2].plot(lim, lim, "k--", lw=0.8)
    axes[2].set_xlabel("V* (value iteration)"), axes[2].set_ylabel("learned V")
    axes[2].set_title("learned vs optimal values (non-terminal squares)", fontsize=10)
    fig.tight_layout()
    fig.savefig(run.plots_dir / "values.png", dpi=80)
    plt.close(fig)

    if rows and "env/success" in rows[0]:
        x = [r["step"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        axes[0].plot(x, [r["env/success"] for r in rows])
        axes[0].set_title("success rate (behaviour policy)", fontsize=10)
        axes[1].plot(x, [r["env/return"] for r in rows])
        axes[1].set_title("discounted return", fontsize=10)
        key = "loss/td_error" if "loss/td_error" in rows[0] else "loss/policy"
        axes[2].plot(x, [r[key] for r in rows])
        axes[2].set_title(key, fontsize=10)
        for ax in axes:
            ax.set_xlabel("episode")
        fig.tight_layout()
        fig.savefig(run.plots_dir / "training.png", dpi=80)
        plt.close(fig)


cli = command(
    "icemaze",
    IceMazeConfig,
    train,
    help="Ice Maze: reach the prize across a frozen lake with value iteration, Q-learning or REINFORCE.",
)
