"""A fast SwiGLU for MLX's Linux CPU wheel: sigmoid from multiply-adds instead of scalar exp.

Why: MLX's Linux x86 CPU build computes transcendental functions (exp,
sigmoid, tanh) one element at a time, about 13 ns per element, while a
multiply costs about 0.5 ns. For a (896, 2048) array: mx.exp 22 ms,
mx.sigmoid 28 ms, a * a + 1 about 1 ms. The tiny model's SwiGLU
(silu(gate) * up, silu(x) = x * sigmoid(x)) was therefore about half of the
training forward pass, again in the backward, and 40% of a decoding step,
while its matmuls are fast (OpenBLAS, see blas.py).

What: exp(x) written with multiply-adds, as the Cephes library's expf does:

    n = round(x / ln 2),  r = x - n ln 2          (|r| <= ln2 / 2; ln 2 split hi + lo for precision)
    exp(r) ~ 1 + r + r^2 p(r),  p of degree 5     (relative error ~1e-7)
    2^n     = the float32 whose exponent bits are n + 127

and sigmoid(x) = 1 / (1 + exp(-x)). Compiled with mx.compile, it runs as
three fused loops (the bit cast `view` can't be fused, so it splits them):
~5 ms instead of 28 ms on that array, max relative error ~1.2e-7 (MLX's own
sigmoid: ~9e-7). The bit trick is not differentiable, so silu carries its own
derivative (d silu / dx = s + x s (1 - s), s = sigmoid(x)) through
mx.custom_function. Measured effect on the GRPO step benchmark (tiny model,
8 x 8 rollouts, 2-core box under the same load): 198 -> 160 ms per step;
forward_backward 128 -> 103 ms, generate 57 -> 45 ms.
Tried and slower: computing 2^n without `view` (bit-by-bit selects), which
fuses into one loop but runs 2x slower than the three.

How it is used: `install()` (run by `speed.enable()` through
`install_when_imported()`, as soon as mlx-lm is imported) replaces the `swiglu`
function of mlx-lm's model files (mlx_lm.models.activations and every
architecture module that imported it: qwen3, llama, qwen2, ...), so any
mlx-lm model built afterwards, or already imported, uses it. It only does so
on Linux with the CPU backend: on macOS (Metal, Accelerate) MLX's own kernels
are vectorised and nothing here runs. Set MLX_RL_FAST_EXP=0 to turn it off.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

import mlx.core as mx

LOG2E = 1.4426950408889634
LN2_HI = 0.693359375  # ln 2 = LN2_HI + LN2_LO; LN2_HI has few mantissa bits, so n * LN2_HI is exact
LN2_LO = -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)

ACTIVATIONS = "mlx_lm.models.activations"
installed = False  # whether install() replaced mlx-lm's swiglu, for reports and tests


@mx.compile  # not shapeless: `view` needs known shapes (retraced per new shape)
def exp(x):
    """exp(x) for float32 from multiply-adds and a bit shift. Not differentiable (use it inside custom functions)."""
    x = mx.clip(x, -87.0, 88.0)  # exp(88) is just below float32's max; exp(-87) is still a normal float
    # n = round(x / ln 2), biased by 127 (float32's exponent bias) so that it is positive and the
    # cast's truncation rounds down (mx.floor would call libm's floorf once per element).
    biased_n = (x * LOG2E + 127.5).astype(mx.int32)  # n + 127, in [1, 254]
    n = biased_n.astype(mx.float32) - 127.0
    r = x - n * LN2_HI - n * LN2_LO  # |r| <= ln 2 / 2
    p = EXP_POLY[0]
    for c in EXP_POLY[1:]:
        p = p * r + c
    exp_r = p * r * r + r + 1.0
    two_n = (biased_n << 23).view(mx.float32)  # 2^n: n + 127 in the exponent bits
    return exp_r * two_n


@mx.compile  # not shapeless: `view` needs known shapes (retraced per new shape)
def _sigmoid(x):
    return 1.0 / (1.0 + exp(-x))  # x very negative: exp(87) is finite, so this is tiny, not NaN


@mx.custom_function
def sigmoid(x):
    """1 / (1 + exp(-x)) with the fast exp; float32."""
    return _sigmoid(x)


@sigmoid.vjp
def _sigmoid_vjp(x, cotangent, output):
    return cotangent * output * (1.0 - output)


@mx.custom_function
def silu(x):
    """x * sigmoid(x) with the fast exp; differentiable through its own vjp."""
    return x * _sigmoid(x)


@silu.vjp
def _silu_vjp(x, cotangent, output):  # one input: MLX passes the array itself as the primals
    return _silu_grad(x, cotangent)


@mx.compile  # not shapeless: `view` needs known shapes (retraced per new shape)
def _silu_grad(x, cotangent):
    s = _sigmoid(x)  # recomputed: cheaper than keeping it, and a compiled step merges the two
    return cotangent * (s + x * s * (1.0 - s))


@mx.compile  # not shapeless: `view` needs known shapes (retraced per new shape)
def _swiglu(gate, x):
    return silu(gate) * x


def swiglu(gate, x):
    """mlx_lm.models.activations.swiglu with the fast silu: silu(gate) * x.

    Float32 only (the bit trick builds float32 powers of two); other dtypes use mlx-lm's own.
    """
    if gate.dtype == mx.float32 and x.dtype == mx.float32:
        return _swiglu(gate, x)
    return original_swiglu(gate, x)


def wanted():
    """Install only on Linux, on the CPU backend, unless MLX_RL_FAST_EXP=0."""
    setting = os.environ.get("MLX_RL_FAST_EXP", "auto").strip().lower()
    if setting in ("0", "off", "no", "false"):
        return False
    return sys.platform.startswith("linux") and mx.default_device() == mx.cpu


def install():
    """Make mlx-lm's models use the fast swiglu (see the module docstring). Returns True if installed."""
    global installed
    if not wanted():
        return False
    activations = importlib.import_module(ACTIVATIONS)
    original = activations.__dict__.setdefault("_mlx_rl_original_swiglu", activations.swiglu)
    # activations itself (architecture modules imported from now on pick up the fast one) and those already imported
    replace_in_mlx_lm("swiglu", original, swiglu)
    installed = True
    from mlx_rl.engine import attention

    attention.install()  # its softmax uses the exp above: one switch for both
    return True


def uninstall():
    """Put mlx-lm's own swiglu back everywhere (tests compare the two)."""
    global installed
    activations = sys.modules.get(ACTIVATIONS)
    original = activations and activations.__dict__.get("_mlx_rl_original_swiglu")
    if original is None:
        return
    replace_in_mlx_lm("swiglu", swiglu, original)
    installed = False


def replace_in_mlx_lm(name, old, new):
    """Wherever an imported mlx_lm module's `name` is `old`, make it `new` (this module's and attention.py's install)."""
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("mlx_lm.") and getattr(module, name, None) is old:
            setattr(module, name, new)


def original_swiglu(gate, x):
    activations = importlib.import_module(ACTIVATIONS)
    return activations.__dict__.get("_mlx_rl_original_swiglu", activations.swiglu)(gate, x)


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """An import hook: when mlx-lm's activations module is first imported, run install() right after.

    (Importing mlx-lm up front would add most of a second to every `mlx-rl` command, --help included.)
    """

    def find_spec(self, name, path=None, target=None):
        if name != ACTIVATIONS:
            return None
        sys.meta_path.remove(self)  # one shot; also lets the ordinary finders below find the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            install()

        spec.loader.exec_module = exec_then_install
        return spec


def install_when_imported():
    """install() now if mlx-lm's activations are already imported, else as soon as they are."""
    if ACTIVATIONS in sys.modules:
        return install()
    if not any(isinstance(f, _InstallAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterImport())
    return False
