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


class Kernels:
    """The loaded shared library, its functions typed for ctypes."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        L, P, D, I = ctypes.c_long, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
        self.step, self.free_step, self.anderson_mix, self.noisy_step = {}, {}, {}, {}
        self.ebd_residuals, self.ebd_descend, self.two_products = {}, {}, {}
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"lcp_step_{suffix}")
            fn.argtypes = [L, L, L, L, P, P, P, P, P, P, P, P, L, P, P, L,
                           D, D, D, D, D, I, D, D, I, P, P, I]
            fn.restype = D
            self.step[suffix] = fn
            free = getattr(lib, f"lcp_free_step_{suffix}")
            free.argtypes = [L, L, P, P, P, P, P, I]
            free.restype = D
            self.free_step[suffix] = free
            mix = getattr(lib, f"lcp_anderson_mix_{suffix}")
            mix.argtypes = [L, L, L, L, P, P, P, L, L, L, P, D, P, P, I]
            mix.restype = I
            self.anderson_mix[suffix] = mix
            noisy = getattr(lib, f"lcp_noisy_step_{suffix}")
            noisy.argtypes = [L, L, L] + [P] * 12 + [L] + [P] * 5 + [D] * 9 + [I]
            noisy.restype = None
            self.noisy_step[suffix] = noisy
            residuals = getattr(lib, f"lcp_ebd_residuals_{suffix}")
            residuals.argtypes = [L, L, L] + [P] * 5 + [L] + [P] * 3 + [I]
            residuals.restype = None
            descend = getattr(lib, f"lcp_ebd_descend_{suffix}")
            descend.argtypes = ([L, L, L] + [P] * 6 + [L, P, D, P, P, I] + [D] * 6 + [I])
            descend.restype = None
            self.ebd_residuals[suffix], self.ebd_descend[suffix] = residuals, descend
            two = getattr(lib, f"lcp_two_products_{suffix}")
            two.argtypes = [I, I, I, P, I, P, I, P, I] * 2 + [I]
            two.restype = None
            self.two_products[suffix] = two
        # the BLAS inside PyTorch's own library, for lcp_two_products (absent: torch.mm is used)
        self.blas = False
        init = lib.lcp_blas_init
        init.argtypes, init.restype = [ctypes.c_char_p], I
        for candidate in _torch_libraries():
            if init(str(candidate).encode()):
                self.blas = True
                break


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
