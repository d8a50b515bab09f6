"""Switch on the two speed-ups for MLX's Linux CPU backend, explicitly, where a run starts.

- OpenBLAS (blas.py): MLX's Linux wheel links a reference BLAS that is about 12x
  slower; Debian's OpenBLAS, loaded before MLX, replaces it. It must happen
  before the first `import mlx`, so `enable()` is the first thing the CLI does.
- A fast SwiGLU and attention (fastmath.py, attention.py): MLX's Linux CPU build
  computes exp one element at a time; mlx-lm's SwiGLU gets a sigmoid made of
  multiply-adds, and its attention a softmax of them, over causal blocks that
  skip the keys a query can't see.

Neither runs on macOS (Metal), and each can be turned off by an environment
variable (MLX_RL_OPENBLAS=0, MLX_RL_FAST_EXP=0, MLX_RL_FAST_ATTENTION=0). `runtime()` says what is on,
for the run's config.json; `blas_notice()` is the one line a Linux user without
OpenBLAS sees at the start of a run.
"""

import os
import sys

from mlx_rl.engine import blas

_enabled = False


def enable():
    """Load OpenBLAS (Linux, if installed) and install the fast SwiGLU and attention (Linux CPU). Safe to call twice."""
    global _enabled
    if _enabled:
        return
    blas.use_openblas()  # before anything imports mlx
    from mlx_rl.engine import fastmath

    fastmath.install_when_imported()  # when mlx-lm's activations are imported (keeps --help fast)
    _enabled = True


def runtime():
    """What this process runs on, recorded in every run's config.json under "runtime"."""
    import mlx.core as mx

    from mlx_rl.engine import attention, fastmath

    return {
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "blas": blas.loaded_path or "MLX's bundled BLAS",
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "all cores"),
        "blas_kernels": os.environ.get("OPENBLAS_CORETYPE", "OpenBLAS's own choice") if blas.loaded_path else None,
        "fast_swiglu": fastmath.wanted(),
        "fast_attention": attention.wanted(),
        "platform": sys.platform,
    }


def blas_notice():
    """One line for Linux users whose runs take MLX's slow reference BLAS, or None."""
    if not sys.platform.startswith("linux") or blas.loaded_path or blas.disabled_by_user():
        return None
    return ("note: OpenBLAS was not found, so MLX uses its reference BLAS: training runs about 12x slower "
            "(measured: a pretraining step 849 -> 70 ms). Fix: sudo apt-get install libopenblas0-pthread")
