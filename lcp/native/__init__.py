"""Compiled element-wise passes for the no-grad dynamics on CPU (`dynamics.c`).

On the linear-block tanh models (ff, rnn) a step of any phase — controlled (lcp-di/kp/lf,
Euler or Anderson), free, lcp-lf's noisy phase, lcp-ebd's descent — is tanh and the blocks'
large matrix products (PyTorch's kernels) plus one or two passes here that do everything else,
including the solver's stopping error. The C source beside this file is compiled on first use
with the machine's C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`, then plainer
flags) into a cache folder (`$LCP_CACHE_DIR`, else `~/.cache/lcp`; a temporary folder if that
is not writable) and loaded with ctypes: no build step at install time and no Python headers.
Where there is no compiler, or the build fails, or `LCP_NATIVE=0` is set, `library()` returns
None and the same dynamics run on PyTorch's kernels alone (slower on CPU). `status()` says which
and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("dynamics.c")
_FLAG_SETS = (
    # -fopenmp: the rows are split over PyTorch's threads (torch.get_num_threads()); the
    # library then shares the OpenMP runtime PyTorch has loaded
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno"],
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"],
    ["-O3", "-fopenmp-simd", "-fno-math-errno"],  # compilers without -march=native
    ["-O2"],
)

_lock = threading.Lock()
_library: "Kernels | None" = None
_reason: str | None = None  # why there is no library (None: not tried yet, or loaded)
_tried = False
_disabled = 0  # > 0 inside `disabled()`


@contextlib.contextmanager
def disabled():
    """Inside this block `library()` returns None: the dynamics built there run on PyTorch's
    kernels (to compare the two)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


_L, _P, _D, _I = ctypes.c_long, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
# every typed pass of dynamics.c, as (name, argument types, result type); each exists for
# float32 (`lcp_<name>_f32`) and float64 (`lcp_<name>_f64`)
_SIGNATURES = (
    ("step", [_L] * 4 + [_P] * 8 + [_L, _P, _P, _L] + [_D] * 5 + [_I, _D, _D, _I, _P, _P, _I],
     _D),
    ("free_step", [_L, _L] + [_P] * 5 + [_I], _D),
    ("anderson_mix", [_L] * 4 + [_P] * 3 + [_L] * 3 + [_P, _D, _P, _P, _I], _I),
    ("noisy_step", [_L] * 3 + [_P] * 12 + [_L] + [_P] * 5 + [_D] * 9 + [_I], None),
    ("ebd_residuals", [_L] * 3 + [_P] * 5 + [_L] + [_P] * 3 + [_I], None),
    ("ebd_descend", [_L] * 3 + [_P] * 6 + [_L, _P, _D, _P, _P, _I] + [_D] * 6 + [_I], None),
    ("two_products", [_I, _I, _I, _P, _I, _P, _I, _P, _I] * 2 + [_I], None),
)


class Kernels:
    """The loaded shared library, its functions typed for ctypes: `get(name, dtype)`."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        self._functions = {}
        for name, argtypes, restype in _SIGNATURES:
            for suffix, dtype_name in (("f32", "float32"), ("f64", "float64")):
                fn = getattr(lib, f"lcp_{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, restype
                self._functions[name, dtype_name] = fn
        # the BLAS inside PyTorch's own library, for lcp_two_products (absent: torch.mm is used)
        self.blas = False
        init = lib.lcp_blas_init
        init.argtypes, init.restype = [ctypes.c_char_p], _I
        for candidate in _torch_libraries():
            if init(str(candidate).encode()):
                self.blas = True
                break

    def get(self, name: str, dtype):
        """The pass `name` (see `_SIGNATURES`) for tensors of `dtype` (torch.float32/64)."""
        return self._functions[name, str(dtype).rpartition(".")[2]]


def _torch_libraries() -> list[Path]:
    """PyTorch's CPU library files (whichever of them this platform has)."""
    import torch

    folder = Path(torch.__file__).parent / "lib"
    return [p for name in ("libtorch_cpu.so", "libtorch_cpu.dylib") if (p := folder / name).exists()]


def threads_for(rows: int, width: int) -> int:
    """How many of PyTorch's threads a compiled pass over `rows` × `width` values uses (one
    for small ones, where starting threads costs more than it saves)."""
    import torch

    return int(torch.get_num_threads()) if rows * width >= 4096 else 1


def _cache_dir() -> Path:
    base = os.environ.get("LCP_CACHE_DIR") or os.path.join(Path.home(), ".cache", "lcp")
    path = Path(base) / "native"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return path
    except OSError:
        path = Path(tempfile.gettempdir()) / f"lcp-native-{os.getuid() if hasattr(os, 'getuid') else 0}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + " ".join([compiler, *flags, platform.machine(),
                                                 platform.node()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"dynamics-{key}.so"
        if target.exists():
            return target
        # build beside the target and rename: concurrent workers never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, "-std=c11", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-lm"]
        if platform.system() == "Linux":
            cmd.append("-ldl")  # dlopen on a C library older than glibc 2.34
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            os.unlink(tmp)
            raise RuntimeError(f"cannot run the C compiler {compiler!r}: {exc}") from None
        if proc.returncode == 0:
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-400:]}")
    raise RuntimeError("the C compiler failed: " + " | ".join(errors))


def library() -> Kernels | None:
    """The compiled kernels, building them on first use; None where they cannot be had."""
    global _library, _reason, _tried
    if _disabled:
        return None
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("LCP_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "disabled by LCP_NATIVE=0"
            return None
        compiler = os.environ.get("CC") or "cc"
        if shutil.which(compiler) is None:
            _reason = f"no C compiler ({compiler!r} not found; set CC)"
            return None
        try:
            _library = Kernels(_build(compiler))
        except (RuntimeError, OSError, AttributeError) as exc:
            _reason = str(exc)
            _library = None
        return _library


def status() -> str:
    """One line: whether the compiled kernels are in use, and why not."""
    lib = library()
    if lib is not None:
        return f"compiled kernels in use ({lib.path})"
    return f"compiled kernels not in use: {_reason}; the dynamics run on PyTorch kernels"


def summary() -> str:
    """'on', or 'off: <why>' (for run tags and log lines)."""
    return "on" if library() is not None else f"off: {_reason or 'disabled'}"


def reset() -> None:
    """Forget the loaded library (tests: try again under other settings)."""
    global _library, _reason, _tried
    with _lock:
        _library, _reason, _tried = None, None, False
