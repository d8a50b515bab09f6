"""Ice Maze: the environment, the maths against hand-worked numbers, the CLI, and (slow) the learners."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_rl.cli import main
from mlx_rl.config import MlxRlError
from mlx_rl.chapters.icemaze import (
    DOWN, LEFT, MAPS, RIGHT, UP, IceMaze, IceMazeConfig, PolicyNet, advantages_of, discounted_returns,
    load_map, min_steps, one_hot_policy, q_learning_episode, reinforce_loss, rollout,
    success_probability, value_iteration,
)


def env4(**kw):
    return IceMaze(MAPS["4x4"], **kw)


# --- the environment ---------------------------------------------------------------


def test_edges_leave_the_agent_in_place():
    env, rng = env4(), np.random.default_rng(0)
    assert env.step(0, LEFT, rng) == (0, 0.0, False)
    assert env.step(0, UP, rng) == (0, 0.0, False)
    assert env.step(3, RIGHT, rng) == (3, 0.0, False)
    assert env.step(0, RIGHT, rng) == (1, 0.0, False)
    assert env.step(0, DOWN, rng) == (4, 0.0, False)


def test_holes_and_goal_end_the_episode():
    env, rng = env4(), np.random.default_rng(0)
    assert env.step(1, DOWN, rng) == (5, 0.0, True)  # (1, 1) is a hole: a loss
    assert env.step(14, RIGHT, rng) == (15, 1.0, True)  # the goal: a win
    assert env.terminal.tolist() == [t in "HG" for t in "SFFFFHFHFFFHHFFG"]


def test_step_penalty_applies_to_every_move():
    env, rng = env4(step_penalty=0.01), np.random.default_rng(0)
    assert env.step(0, RIGHT, rng)[1] == pytest.approx(-0.01)
    assert env.step(14, RIGHT, rng)[1] == pytest.approx(0.99)


def test_slippery_table_and_frequencies_are_one_third_each():
    env, rng = env4(slippery=True), np.random.default_rng(0)
    # From (2, 1) pushing down: down to 13, or slip left to 8 or right to 10.
    assert sorted((s2, round(p, 6)) for p, s2, _, _ in env.P[9][DOWN]) == [(8, 0.333333), (10, 0.333333), (13, 0.333333)]
    n = 30_000
    counts = np.bincount([env.step(9, DOWN, rng)[0] for _ in range(n)], minlength=16)
    sigma = np.sqrt(1 / 3 * 2 / 3 / n)  # about 0.0027
    for s2 in (8, 10, 13):
        assert abs(counts[s2] / n - 1 / 3) < 5 * sigma
    assert counts.sum() == counts[[8, 10, 13]].sum()
    # Never backwards: up is not among the outcomes of down.
    assert counts[5] == 0


def test_transition_table_is_a_distribution():
    for rows in MAPS.values():
        env = IceMaze(rows, slippery=True)
        P, R, terminal = env.tables()
        np.testing.assert_allclose(P.sum(axis=2), 1.0)
        assert R.max() == 1.0


def test_render_draws_the_board_and_arrows():
    env = env4()
    assert env.render().splitlines()[0] == "S F F F"
    assert env.render(state=0).splitlines()[0] == "@ F F F"
    assert env.render(policy=np.full(16, RIGHT)).splitlines()[3] == "H \u2192 \u2192 G"


# --- maps ------------------------------------------------------------------------------


def test_builtin_maps_and_shortest_paths():
    assert min_steps(MAPS["4x4"]) == 6
    assert min_steps(MAPS["8x8"]) == 14


def test_maps_from_strings_and_files(tmp_path):
    assert load_map("SFF/FHF/FFG") == ["SFF", "FHF", "FFG"]
    f = tmp_path / "board.txt"
    f.write_text("SFF\nFHF\nFFG\n")
    assert load_map(str(f)) == ["SFF", "FHF", "FFG"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("9x9", "unknown map"),
        ("FFF/FHF/FFG", "exactly one start"),
        ("SFF/FHF/FFF", "no goal"),
        ("SXF/FHF/FFG", "unknown tiles"),
        ("SFF/FH/FFG", "different lengths"),
        ("SHF/HHF/FFG", "unsolvable"),
        ("random:1x4", "bad random map size"),
    ],
)
def test_bad_maps_raise_one_clear_error(spec, message):
    with pytest.raises(MlxRlError, match=message) as e:
        load_map(spec)
    assert "\n" not in str(e.value)


def test_random_maps_are_solvable_and_seeded():
    for seed in range(30):
        for spec in ("random:4", "random:8", "random:5x9"):
            rows = load_map(spec, seed=seed, hole_prob=0.35)
            assert rows[0][0] == "S" and rows[-1][-1] == "G"
            assert min_steps(rows) is not None
    assert load_map("random:8", seed=3) == load_map("random:8", seed=3)
    assert load_map("random:8", seed=3) != load_map("random:8", seed=4)


# --- the maths ---------------------------------------------------------------------------


def test_discounted_returns_hand_computed():
    # Episode 1: 0, 0, +1.  Episode 2: 0, +1, then padding.  gamma = 0.9.
    rewards = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    expected = np.array([[0.81, 0.9, 1.0], [0.9, 1.0, 0.0]])
    np.testing.assert_allclose(discounted_returns(rewards, mask, 0.9), expected)
    # With a step penalty of 0.1 on each of three moves: -0.1 - 0.09 + 0.9 * 0.81 = 0.539.
    rewards = np.array([[-0.1, -0.1, 0.9]])
    assert discounted_returns(rewards, np.ones((1, 3)), 0.9)[0, 0] == pytest.approx(-0.1 - 0.09 + 0.9 * 0.81)


def test_value_iteration_deterministic_is_gamma_to_the_distance():
    env = env4()
    V, Q, policy, _ = value_iteration(*env.tables(), gamma=0.9)
    # Six moves to the goal from S, reward on the sixth: V(S) = 0.9^5.
    assert V[0] == pytest.approx(0.9**5)
    assert V[14] == pytest.approx(1.0) and V[15] == 0.0 and V[5] == 0.0
    assert Q[14, RIGHT] == pytest.approx(1.0) and Q[14, UP] == pytest.approx(0.9**2)
    assert advantages_of(Q)[14, UP] == pytest.approx(0.81 - 1.0)
    assert advantages_of(Q).max() == 0.0


def test_value_iteration_slippery_known_values():
    # Slippery 4x4 with gamma = 1: the optimal success probabilities are multiples of 1/17.
    env = env4(slippery=True)
    V, _, _, _ = value_iteration(*env.tables(), gamma=1.0, tol=1e-12)
    expected = np.array([14, 14, 14, 14, 14, 0, 9, 0, 14, 14, 13, 0, 0, 15, 16, 0]) / 17
    np.testing.assert_allclose(V, expected, atol=1e-6)


def test_rollout_matches_exact_success_probability_and_shares_luck():
    env = env4(slippery=True)
    _, _, policy, _ = value_iteration(*env.tables(), gamma=0.99)
    exact = success_probability(env, one_hot_policy(policy))
    assert exact == pytest.approx(0.7402, abs=1e-3)
    eps = rollout(env, one_hot_policy(policy), 20_000, np.random.default_rng(0))
    assert abs(eps.success.mean() - exact) < 0.015  # 4.5 standard errors
    again = rollout(env, one_hot_policy(policy), 20_000, np.random.default_rng(0))
    assert (again.lengths == eps.lengths).all()  # same seed, same policy: same episodes


def test_q_learning_update_on_a_two_square_corridor():
    env = IceMaze(["SG"])
    Q = [[0.0] * 4 for _ in range(2)]
    out = q_learning_episode(env, Q, epsilon=0.0, alpha=0.5, gamma=0.9, rng=np.random.default_rng(0))
    # Greedy with ties broken at random: the agent bumps the edges until it steps right.
    assert out["success"] == 1.0 and Q[0][RIGHT] == pytest.approx(0.5)
    assert out["td_error"] > 0


def test_reinforce_loss_matches_numpy_reference():
    mx.random.seed(0)
    S, A = 16, 4
    model = PolicyNet(S, A, hidden=0)
    states = np.array([[0, 1, 2], [0, 4, 0]])
    actions = np.array([[RIGHT, RIGHT, DOWN], [DOWN, UP, LEFT]])
    returns = np.array([[0.81, 0.9, 1.0], [0.5, 0.2, 0.0]])
    mask = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    args = (mx.eye(S)[mx.array(states)], mx.array(actions), mx.array(returns, dtype=mx.float32),
            mx.array(mask, dtype=mx.float32), 0.5, 0.01)
    loss, metrics = reinforce_loss(model, *args)

    W, b = np.array(model.policy_head.weight), np.array(model.policy_head.bias)
    Wv, bv = np.array(model.value_head.weight)[0], np.array(model.value_head.bias)[0]
    policy_loss = value_loss = entropy = 0.0
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            logits = W[:, states[i, t]] + b
            logp = logits - np.log(np.exp(logits).sum())
            v = Wv[states[i, t]] + bv
            policy_loss -= logp[actions[i, t]] * (returns[i, t] - v) / 5
            value_loss += 0.5 * (returns[i, t] - v) ** 2 / 5
            entropy -= (np.exp(logp) * logp).sum() / 5
    assert metrics["loss/policy"].item() == pytest.approx(policy_loss, rel=1e-4)
    assert metrics["loss/value"].item() == pytest.approx(value_loss, rel=1e-4)
    assert metrics["policy/entropy"].item() == pytest.approx(entropy, rel=1e-4)
    assert loss.item() == pytest.approx(policy_loss + 0.5 * value_loss - 0.01 * entropy, rel=1e-4)

    # The gradient reaches the policy, and steps on a fixed batch make the good moves likelier.
    (_, _), grads = nn.value_and_grad(model, lambda *a: reinforce_loss(model, *a))(*args)
    assert float(mx.abs(grads["policy_head"]["weight"]).sum()) > 0
    before = mx.softmax(model(mx.eye(S)[0])[0])[RIGHT].item()
    import mlx.optimizers as optim

    opt = optim.Adam(learning_rate=0.05)
    for _ in range(20):
        _, grads = nn.value_and_grad(model, lambda *a: reinforce_loss(model, *a))(*args)
        opt.update(model, grads)
    assert mx.softmax(model(mx.eye(S)[0])[0])[RIGHT].item() > before


# --- the command ------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["q_learning", "reinforce", "value_iteration"])
def test_cli_smoke(tmp_path, algo):
    out = tmp_path / "run"
    main(["icemaze", "--algo", algo, "--episodes", "20", "--batch-episodes", "10", "--eval-episodes", "50", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == algo and config["command"] == "icemaze"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows
    if algo != "value_iteration":
        assert {"env/return", "env/length", "env/success"} <= set(rows[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chapter"] == "icemaze" and summary["status"] == "finished"
    assert summary["after"]["eval/success_rate"] == summary["details"]["eval"]["success_rate"]
    summary = summary["details"]  # the chapter's own figures
    assert {"eval", "value_iteration", "min_steps", "success_gap"} <= set(summary)
    assert summary["min_steps"] == 6
    assert (out / "plots" / "policy.png").exists() and (out / "plots" / "values.png").exists()
    assert (out / "tables.json").exists()


def test_cli_bad_map_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["icemaze", "--map", "SFF/FH/FFG", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_config_defaults_are_the_documented_ones():
    cfg = IceMazeConfig()
    assert (cfg.map, cfg.algo, cfg.gamma, cfg.eval_episodes) == ("4x4", "q_learning", 0.99, 2000)


# --- the learners (the chapter's acceptance figures) --------------------------------------


def run_default(tmp_path, *args):
    """summary.json's chapter figures (details), with the run's wall time."""
    out = tmp_path / "run"
    main(["icemaze", *args, "--out", str(out), "--no-plots"])
    summary = json.loads((out / "summary.json").read_text())
    return {**summary["details"], "wall_s": summary["wall_s"]}


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["q_learning", "reinforce"])
@pytest.mark.parametrize("board, shortest", [("4x4", 6), ("8x8", 14)])
def test_deterministic_learners_find_the_shortest_path(tmp_path, algo, board, shortest):
    summary = run_default(tmp_path, "--algo", algo, "--map", board)
    assert summary["min_steps"] == shortest
    assert summary["eval"]["success_rate"] == 1.0
    assert summary["eval"]["success_max_length"] == shortest
    assert summary["wall_s"] < 60


@pytest.mark.acceptance
@pytest.mark.parametrize("algo", ["q_learning", "reinforce"])
@pytest.mark.parametrize("board", ["4x4", "8x8"])
def test_slippery_learners_match_value_iteration(tmp_path, algo, board):
    """Within 3 points of the optimum, except REINFORCE on 8x8 slippery ice: its default run (60,000 episodes)
    ends about 8 points short (docs/runs/icemaze-reinforce-8x8-slippery: exact success probability 78.2% against
    value iteration's 86.3%), and the test says so rather than claim more."""
    summary = run_default(tmp_path, "--algo", algo, "--map", board, "--slippery")
    tolerance = 0.10 if (algo, board) == ("reinforce", "8x8") else 0.03
    gap = summary["value_iteration"]["success_probability"] - summary["eval"]["success_probability"]
    assert gap <= tolerance, (summary["eval"]["success_probability"], summary["value_iteration"]["success_probability"])
    assert summary["success_gap"] <= tolerance + 0.03  # the sampled figures: 2,000 episodes each
