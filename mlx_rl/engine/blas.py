"""Use OpenBLAS for MLX's matrix multiplies on Linux, when it is installed.

MLX's Linux CPU wheel links a slow reference BLAS (about 6 GFLOP/s for a
1024x1024 matmul on a 2-core box). MLX imports only `cblas_sgemm` and a few
friends from it, so loading Debian's OpenBLAS into the process *before* MLX,
with RTLD_GLOBAL, makes the dynamic linker resolve those symbols to OpenBLAS
instead (about 200-300 GFLOP/s on the same box). This has to happen before the
first `import mlx`, which is why `speed.enable()` runs first where a run starts.

Control it with the environment variable MLX_RL_OPENBLAS:
  unset or "auto"   load OpenBLAS from the usual Debian/Ubuntu paths if present
  "0" / "off"       never load it (use MLX's bundled BLAS)
  a file path       load that library instead
Install it on Debian/Ubuntu with `apt-get install libopenblas0-pthread`.
macOS uses Accelerate/Metal and nothing here runs.

OpenBLAS picks its kernels by asking the CPU what it is, and a release older than
the CPU can guess badly: Debian 12's OpenBLAS 0.3.21 takes a Sapphire Rapids
cloud VM for a Pentium 4 ("Prescott") and multiplies at 35-42 GFLOP/s, against
about 200 with its AVX-512 kernels ("SkylakeX"), measured here on a 1024^3 and a
1856x576x1536 float32 matmul. So unless OPENBLAS_CORETYPE is set, it is set from
the instruction sets the CPU reports: SkylakeX with AVX-512, Haswell with AVX2.

Several ranks of one run on one machine (`mlx.launch -n 2` over loopback) would
each start one OpenBLAS thread per core, and the threads then fight over the
cores: a 2-process pretraining step here took 467 ms so, 187 ms with the cores
shared out. So when the launcher's hostfile puts k ranks on loopback, each gets
cores / k threads (OPENBLAS_NUM_THREADS, unless you set it yourself).
"""

import ctypes
import glob
import json
import os
import sys

CANDIDATES = [
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

loaded_path = None  # which library was loaded, for reports


def find_openblas():
    for pattern in CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            return path
    return None


def disabled_by_user():
    return os.environ.get("MLX_RL_OPENBLAS", "auto").strip().lower() in ("0", "off", "no", "false")


def cpu_flags():
    """The CPU's instruction-set flags from /proc/cpuinfo (Linux), or an empty set."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernels_for(flags):
    """The OpenBLAS core type whose float32 kernels these flags can run, or None (leave it to OpenBLAS)."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def choose_kernels():
    """Set OPENBLAS_CORETYPE from the CPU's flags unless the user has; returns what it set, or None."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return None
    core = kernels_for(cpu_flags())
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
    return core


def ranks_on_loopback():
    """How many ranks of an `mlx.launch` ring run share this machine over loopback (0 when not launched so)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if "MLX_RANK" not in os.environ or not hostfile:
        return 0
    try:
        hosts = json.loads(open(hostfile).read())
        return sum(1 for addresses in hosts
                   if addresses and str(addresses[0]).rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]", "::1"))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def share_cores():
    """OPENBLAS_NUM_THREADS = cores / ranks here, for several ranks on one machine; returns the count or None."""
    ranks = ranks_on_loopback()
    if ranks < 2 or "OPENBLAS_NUM_THREADS" in os.environ:
        return None
    threads = max(1, (os.cpu_count() or 1) // ranks)
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    return threads


def use_openblas():
    """Load OpenBLAS globally if allowed and available; return its path or None."""
    global loaded_path
    setting = os.environ.get("MLX_RL_OPENBLAS", "auto").strip()
    if not sys.platform.startswith("linux") or disabled_by_user():
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already resolved its BLAS symbols
    path = find_openblas() if setting.lower() in ("", "auto", "1", "on") else setting
    if path is None:
        return None
    choose_kernels()  # both read by OpenBLAS when it loads
    share_cores()
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        print(f"mlx-rl: could not load OpenBLAS from {path}: {e}", file=sys.stderr)
        return None
    loaded_path = path
    return path
