"""mlx-rl: reinforcement learning for LLM post-training on MLX.

Importing the package does nothing else: the speed-ups (OpenBLAS on Linux, a
fast SwiGLU on MLX's CPU backend) are switched on explicitly where a run starts,
by `mlx_rl.engine.speed.enable()` (the CLI and the test setup call it), and
every run records in its config.json whether they were on.
"""

__version__ = "0.2.0"


def __getattr__(name):
    """`mlx_rl.Run(path)` opens a run directory; `mlx_rl.api` runs any command from Python (mlx_rl/api.py).
    Imported on first use, so `import mlx_rl` stays free of MLX."""
    if name in ("Run", "api"):
        import importlib

        api = importlib.import_module("mlx_rl.api")
        return api if name == "api" else api.Run
    raise AttributeError(f"module 'mlx_rl' has no attribute {name!r}")
