"""mlx-rl: reinforcement learning for LLM post-training on MLX."""

from mlx_rl.blas import use_openblas

use_openblas()  # must run before anything imports mlx; see blas.py

__version__ = "0.1.0"

from mlx_rl.fastmath import install_when_imported  # noqa: E402  (after the BLAS preload: it imports mlx)

install_when_imported()  # a fast SwiGLU for mlx-lm models on Linux CPU; MLX_RL_FAST_EXP=0 turns it off (fastmath.py)
