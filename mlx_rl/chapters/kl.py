"""Chapter: KL divergence, exactly and from samples.

PPO, GRPO and DPO all keep the policy close to a frozen reference, and "close"
is measured with the Kullback-Leibler divergence. This chapter computes it
exactly between two next-token distributions, and shows how the three sample
estimators used in RL code behave as the number of samples grows.

Directions, the part that is easy to get wrong. For distributions p and q over
the vocabulary:
    forward   KL(p || q) = sum_x p(x) (log p(x) - log q(x))
    reverse   KL(q || p) = sum_x q(x) (log q(x) - log p(x))
    jeffreys  KL(p || q) + KL(q || p)            (symmetric)
KL is not symmetric: which distribution the samples come from decides which
direction a sample estimate measures.

Sample estimators (Schulman, "Approximating KL divergence", 2020). Draw x from
q, let r = p(x) / q(x), and pass log r = log p(x) - log q(x):
    k1 = -log r                 unbiased for KL(q || p); high variance, often < 0
    k2 = (log r)^2 / 2          biased (right only to second order as p -> q); >= 0
    k3 = (r - 1) - log r        unbiased (E_q[r] = 1, so E_q[r - 1] = 0); always >= 0
                                because log r <= r - 1; low variance when p ~ q
All three estimate KL(q || p), the divergence *from the sampling distribution*.

In the RL chapters the samples come from the policy. So q = policy and
p = reference, log r = ref_logprobs - policy_logprobs for the policy's own
sampled tokens, and `k3(ref_logprobs - policy_logprobs)` estimates
KL(policy || reference) per token. GRPO's penalty uses k3, as DeepSeekMath
does: unbiased, never negative (a penalty that can reward moving away is a bug
magnet), and with small variance while the policy is near the reference, which
is where a KL penalty keeps it. `kl/k3` is the metric name every chapter logs.

`mlx-rl kl` runs three experiments and writes plots:
  1. small categorical distributions, close and far apart: each estimator's
     mean and spread against the exact KL as the number of samples grows;
  2. bias and one-sample standard deviation of each estimator, computed
     exactly (no sampling), as p moves away from q;
  3. two real checkpoints, a reference and a perturbed copy (or --model-b):
     per-token estimators on sampled completions against the exact per-token
     KL summed over the whole vocabulary.

Simplifications: per-token KL only (sequence KL is the sum over tokens), and
subsets of one pool of sampled tokens stand in for fresh samples in part 3.
"""

import dataclasses
import typing

import mlx.core as mx
import numpy as np

from mlx_rl.config import MlxRlError, command, log_to_option, option

COLORS = {"k1": "tab:blue", "k2": "tab:orange", "k3": "tab:green"}


# --- the maths -------------------------------------------------------------------------------


def log_softmax(x):
    """Logits or log-probs -> normalised log-probs over the last axis (log-probs pass unchanged)."""
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def kl_divergence(logp, logq):
    """KL(p || q) = sum_x p(x) (log p(x) - log q(x)) over the last axis; 0 log 0 counts as 0."""
    p = mx.exp(logp)
    terms = mx.where(p > 0, p * (logp - logq), 0.0)
    return terms.sum(axis=-1)


def exact_kl(p, q, direction="forward"):
    """Exact KL between the next-token distributions p and q, given as logits or log-probs (..., V).

    direction: "forward" KL(p || q), "reverse" KL(q || p), "jeffreys" their sum. Returns (...).
    With the policy as q and the reference as p, "reverse" is KL(policy || reference),
    the quantity the k1/k2/k3 estimators estimate from the policy's samples.
    """
    logp, logq = log_softmax(p), log_softmax(q)
    if direction == "forward":
        return kl_divergence(logp, logq)
    if direction == "reverse":
        return kl_divergence(logq, logp)
    if direction == "jeffreys":
        return kl_divergence(logp, logq) + kl_divergence(logq, logp)
    raise ValueError(f"direction must be forward, reverse or jeffreys, not {direction!r}")


def k1(logr):
    """-log r. logr = log p(x) - log q(x) with x sampled from q; unbiased for KL(q || p), can be < 0."""
    return -logr


def k2(logr):
    """(log r)^2 / 2. Same logr as k1; never negative, but biased: E_q[k2] != KL(q || p) unless p ~ q."""
    return 0.5 * logr**2


def k3(logr):
    """(r - 1) - log r. Same logr as k1; unbiased for KL(q || p) and never negative.

    In GRPO: k3(ref_logprobs - policy_logprobs) on the policy's sampled tokens
    estimates KL(policy || reference) per token. expm1(logr) is r - 1 computed
    without the rounding that makes exp(logr) - 1 - logr dip below zero near 0.
    """
    return mx.expm1(logr) - logr


ESTIMATOR_FNS = {"k1": k1, "k2": k2, "k3": k3}


# --- config ----------------------------------------------------------------------------------


@dataclasses.dataclass
class KLConfig:
    """Settings of `mlx-rl kl`. Not a RunConfig: nothing is trained, so no steps or --resume."""

    out: typing.Optional[str] = option(None, "where to write: the run directory (default: runs/kl-<date>-<time>)")
    log_to: typing.Tuple[str, ...] = log_to_option()
    seed: int = option(0, "random seed for distributions, noise and sampling")
    model: typing.Optional[str] = option(None, "checkpoint of the reference (default: a new random tiny model)")
    model_b: typing.Optional[str] = option(None, "policy checkpoint (default: the reference with --noise added)")
    noise: float = option(0.1, "perturbation of the copy: weight += noise * std(weight) * N(0, 1)", min=0)
    preset: str = option("tiny", "size of a new model when --model is not given", choices=["micro", "tiny", "small"])
    task: str = option("addition", "built-in task whose prompts start the sampled completions")
    sample_prompts: int = option(256, "training prompts the policy samples one completion for (the checkpoint "
                                 "experiment)", min=1, aliases=("prompts",))
    max_new_tokens: int = option(16, "longest completion: tokens sampled per prompt", min=1)
    vocab: int = option(10, "number of categories in the categorical experiments", min=2)
    max_samples: int = option(4096, "largest number of samples per estimate", min=1)
    trials: int = option(1000, "independent estimates per sample size (for mean and spread)", min=2)

    def validate(self):
        from mlx_rl.data.tasks import get_task

        get_task(self.task)  # an unknown task fails before any work is done


# --- experiments -----------------------------------------------------------------------------


def sample_sizes(max_samples):
    sizes = [1]
    while sizes[-1] * 4 <= max_samples:
        sizes.append(sizes[-1] * 4)
    return sizes if sizes[-1] == max_samples else sizes + [max_samples]


def categorical_pair(vocab, distance, seed):
    """Log-probs (p, q) of two categoricals: q random, p = q's logits moved by `distance` * N(0, 1)."""
    rng = np.random.default_rng(seed)
    q_logits = rng.normal(size=vocab)
    p_logits = q_logits + distance * rng.normal(size=vocab)
    return log_softmax(mx.array(p_logits)), log_softmax(mx.array(q_logits))


def estimates_vs_samples(logr, sizes):
    """logr (trials, max_n) of independent draws -> {k: {"n", "mean", "std"}} of the n-sample average."""
    out = {}
    for name, fn in ESTIMATOR_FNS.items():
        values = np.array(fn(logr), dtype=np.float64)  # (trials, max_n)
        running = np.cumsum(values, axis=1)
        means = [running[:, n - 1] / n for n in sizes]  # (trials,) per size
        out[name] = {"n": sizes, "mean": [float(m.mean()) for m in means], "std": [float(m.std()) for m in means]}
    return out


def categorical_experiment(cfg, distance, seed):
    logp, logq = categorical_pair(cfg.vocab, distance, seed)
    sizes = sample_sizes(cfg.max_samples)
    x = mx.random.categorical(logq, shape=(cfg.trials, sizes[-1]), key=mx.random.key(seed))  # samples from q
    logr = logp[x] - logq[x]  # (trials, max_n)
    return {
        "distance": distance,
        "kl_q_p": exact_kl(logp, logq, "reverse").item(),  # what the estimators estimate
        "kl_p_q": exact_kl(logp, logq, "forward").item(),  # the other direction
        "estimators": estimates_vs_samples(logr, sizes),
    }


def exact_moments(logp, logq):
    """E_q[k] and the std of one sample of k, summed exactly over the vocabulary (no sampling)."""
    q = np.exp(np.array(logq, dtype=np.float64))
    out = {}
    for name, fn in ESTIMATOR_FNS.items():
        k = np.array(fn(logp - logq), dtype=np.float64)
        mean = float((q * k).sum())
        out[name] = {"mean": mean, "std": float(np.sqrt(max((q * k**2).sum() - mean**2, 0.0)))}
    return out


def distance_sweep(cfg):
    rows = []
    for distance in np.geomspace(0.02, 3.0, 25):
        logp, logq = categorical_pair(cfg.vocab, float(distance), cfg.seed)
        rows.append({"kl_q_p": exact_kl(logp, logq, "reverse").item(), **exact_moments(logp, logq)})
    return rows


def perturbed_copy(model, noise, seed):
    """A copy of `model` whose every weight moves by noise * its own std * N(0, 1)."""
    import copy

    from mlx.utils import tree_flatten, tree_unflatten

    other = copy.deepcopy(model)
    weights = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(weights))
    moved = [(name, (w + noise * w.std() * mx.random.normal(w.shape, key=k)).astype(w.dtype))
             for (name, w), k in zip(weights, keys)]
    other.update(tree_unflatten(moved))
    mx.eval(other.parameters())
    return other


def checkpoint_experiment(cfg, reference, policy, tokenizer):
    """Per-token estimators on the policy's samples vs the exact per-token KL(policy || reference)."""
    from mlx_rl.data.tasks import get_task
    from mlx_rl.engine.logprobs import completion_batch, reference_logprobs, token_logprobs
    from mlx_rl.engine.sampling import generate

    prompts = get_task(cfg.task).train_rows(np.random.default_rng([cfg.seed, 0]), cfg.sample_prompts, distinct=True)
    mx.random.seed(cfg.seed)
    rollout = generate(policy, tokenizer, prompts, cfg.max_new_tokens, temperature=1.0)  # x ~ q = policy
    tokens, mask = completion_batch(rollout.prompt_ids, rollout.completion_ids, rollout.mask)
    policy_logprobs, _ = token_logprobs(policy, tokens)  # (B, T-1)
    ref_logprobs = reference_logprobs(reference, tokens)  # (B, T-1), p = reference
    logr = ref_logprobs - policy_logprobs  # log p(x) - log q(x)
    # The exact next-token KL at every position, summed over the whole vocabulary.
    policy_logits, ref_logits = policy(tokens[:, :-1]), reference(tokens[:, :-1])  # (B, T-1, V)
    if policy_logits.shape[-1] != ref_logits.shape[-1]:
        raise MlxRlError("--model and --model-b have different vocabularies; KL needs the same tokens")
    exact_reverse = exact_kl(ref_logits, policy_logits, "reverse")  # KL(policy || reference)
    exact_forward = exact_kl(ref_logits, policy_logits, "forward")  # KL(reference || policy)
    keep = np.array(mask) > 0
    pool = {name: np.array(fn(logr), dtype=np.float64)[keep] for name, fn in ESTIMATOR_FNS.items()}
    target = float(np.array(exact_reverse)[keep].mean())

    rng = np.random.default_rng(cfg.seed)
    sizes = sample_sizes(min(cfg.max_samples, keep.sum()))
    estimators = {}
    for name, values in pool.items():
        means = [values[rng.integers(0, len(values), size=(cfg.trials, n))].mean(axis=1) for n in sizes]
        estimators[name] = {"n": sizes, "mean": [float(m.mean()) for m in means], "std": [float(m.std()) for m in means],
                            "pool_mean": float(values.mean()), "per_token_std": float(values.std()),
                            "negative_share": float((values < 0).mean())}
    return {
        "tokens": int(keep.sum()),
        "kl_policy_reference": target,  # mean exact per-token KL(policy || reference)
        "kl_reference_policy": float(np.array(exact_forward)[keep].mean()),
        "mean_abs_logr": float(np.abs(np.array(logr, dtype=np.float64)[keep]).mean()),
        "estimators": estimators,
        "samples": [{"prompt": p, "completion": t} for p, t in zip(prompts[:4], rollout.texts[:4])],
    }


# --- plots -----------------------------------------------------------------------------------


def plot_vs_samples(result, title, path, target_label, other_label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ESTIMATOR_FNS), figsize=(4.3 * len(ESTIMATOR_FNS), 3.8), sharey=True)
    target = result["kl_q_p"] if "kl_q_p" in result else result["kl_policy_reference"]
    other = result["kl_p_q"] if "kl_p_q" in result else result["kl_reference_policy"]
    for ax, name in zip(axes, ESTIMATOR_FNS):
        est = result["estimators"][name]
        n, mean, std = np.array(est["n"]), np.array(est["mean"]), np.array(est["std"])
        ax.fill_between(n, mean - std, mean + std, color=COLORS.get(name), alpha=0.25, label="mean ± 1 std of the estimate")
        ax.plot(n, mean, "o-", color=COLORS.get(name), label=f"{name}: mean of the estimate")
        ax.axhline(target, color="black", lw=1.2, label=target_label)
        ax.axhline(other, color="black", lw=1, ls=":", label=other_label)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("samples per estimate")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("KL estimate (nats)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = np.array([r["kl_q_p"] for r in rows])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ESTIMATOR_FNS:
        ax1.plot(kl, [r[name]["mean"] - r["kl_q_p"] for r in rows], "o-", ms=3, color=COLORS.get(name), label=name)
        ax2.plot(kl, [r[name]["std"] for r in rows], "o-", ms=3, color=COLORS.get(name), label=name)
    ax1.set_title("bias: E_q[k] - KL(q||p)  (exact, no sampling)")
    ax2.set_title("standard deviation of one sample (exact)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("exact KL(q || p) (nats)")
        ax.legend()
    ax2.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the chapter -----------------------------------------------------------------------------


def train(cfg):
    """Run the three experiments; write plots, metrics and summary.json to the run directory."""
    from mlx_rl.engine import speed
    from mlx_rl.engine.live import fmt_duration
    from mlx_rl.engine.loop import summary_dict
    from mlx_rl.engine.models import get_model, load_model
    from mlx_rl.runs import Run, check_out_dir

    if cfg.out is not None:
        check_out_dir(cfg.out)
    run = Run.create("kl", cfg, speed.runtime())
    mx.random.seed(cfg.seed)

    categorical = {}
    for case, distance in (("close", 0.3), ("far", 1.5)):
        result = categorical_experiment(cfg, distance, cfg.seed)
        categorical[case] = result
        plot_vs_samples(
            result, f"{cfg.vocab} categories, x ~ q, {case}: KL(q||p) = {result['kl_q_p']:.3f}, KL(p||q) = {result['kl_p_q']:.3f}",
            run.plots_dir / f"kl-categorical-{case}.png", "exact KL(q || p): the target", "exact KL(p || q): the other direction",
        )
    sweep = distance_sweep(cfg)
    plot_sweep(sweep, run.plots_dir / "kl-bias-and-spread.png")

    reference, tokenizer, _ = get_model(cfg.model, cfg.preset, cfg.seed)
    policy = load_model(cfg.model_b)[0] if cfg.model_b else perturbed_copy(reference, cfg.noise, cfg.seed + 1)
    models = checkpoint_experiment(cfg, reference, policy, tokenizer)
    b_name = cfg.model_b or f"reference + noise {cfg.noise}"
    plot_vs_samples(
        models, f"per token, completions sampled from the policy ({b_name}); reference {cfg.model or 'new ' + cfg.preset + ' model'}",
        run.plots_dir / "kl-checkpoints.png", "exact KL(policy || reference), mean over tokens", "exact KL(reference || policy)",
    )

    for i, n in enumerate(models["estimators"]["k3"]["n"]):  # metrics.jsonl: one row per sample size
        row = {"samples": n, "kl/exact": models["kl_policy_reference"]}
        for name in ESTIMATOR_FNS:
            row[f"kl/{name}"] = models["estimators"][name]["mean"][i]
            row[f"kl/{name}_std"] = models["estimators"][name]["std"][i]
        run.log(n, row)

    details = {"categorical": categorical, "bias_and_spread": sweep, "checkpoints": models,
               "rl_chapters_use": "k3: unbiased for KL(policy || reference), never negative, low variance near the reference"}
    final = {f"kl/{k}": models["estimators"][k]["pool_mean"] for k in ESTIMATOR_FNS}
    final["kl/exact"] = models["kl_policy_reference"]
    summary = run.write_summary(summary_dict("kl", len(models["estimators"]["k3"]["n"]), run.wall_s, {}, {}, final, {},
                                             None, run.path, details))
    report(summary["details"], run)
    print(f"kl: exact KL(policy || reference) {final['kl/exact']:.4f} per token, k3 {final['kl/k3']:.4f} in "
          f"{fmt_duration(summary['wall_s'])}; run in {run.path}")
    return summary


def report(summary, run):
    for case, r in summary["categorical"].items():
        n, last = r["estimators"]["k1"]["n"][-1], {k: r["estimators"][k] for k in ESTIMATOR_FNS}
        print(f"categorical {case}: KL(q||p) = {r['kl_q_p']:.4f}  (other direction {r['kl_p_q']:.4f})")
        for k in ESTIMATOR_FNS:
            print(f"  {k}: mean of {n}-sample estimates {last[k]['mean'][-1]:.4f} ± {last[k]['std'][-1]:.4f},"
                  f" one sample ± {last[k]['std'][0]:.4f}")
    m = summary["checkpoints"]
    print(f"checkpoints: {m['tokens']} sampled tokens, exact KL(policy||reference) = {m['kl_policy_reference']:.4f}"
          f" per token (other direction {m['kl_reference_policy']:.4f})")
    for k in ESTIMATOR_FNS:
        e = m["estimators"][k]
        print(f"  {k}: mean {e['pool_mean']:.4f}, per-token std {e['per_token_std']:.4f}, negative {100 * e['negative_share']:.0f}%")
    print("the RL chapters use k3 (kl/k3)")


cli = command("kl", KLConfig, train, help="KL divergence: exact values and the k1/k2/k3 sample estimators, with plots.")
