"""mlx-rl: reinforcement learning for LLM post-training on MLX.

Importing the package does nothing else: the speed-ups (OpenBLAS on Linux, a
fast SwiGLU on MLX's CPU backend) are switched on explicitly where a run starts,
by `mlx_rl.engine.speed.enable()` (the CLI and the test setup call it), and
every run records in its config.json whether they were on.
"""

__version__ = "0.2.0"
