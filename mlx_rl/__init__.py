"""mlx-rl: reinforcement learning for LLM post-training on MLX."""

from mlx_rl.blas import use_openblas

use_openblas()  # must run before anything imports mlx; see blas.py

__version__ = "0.1.0"
