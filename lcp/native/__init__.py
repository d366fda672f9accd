"""The accelerated CPU backend of the no-grad dynamics (`dynamics.cpp`), one pass per equation
(docs/equations.md names each one's PyTorch definition; docs/speed.md says why and how).

On the linear-block tanh models (ff, rnn) on CPU, a step of the controlled dynamics
(lcp-di/kp/lf), of the free phase, of lcp-lf's noisy phase and of lcp-ebd's descent is tanh and
the blocks' large matrix products (PyTorch's kernels) plus one or two passes of `dynamics.cpp`
that do everything else, including the solver's stopping error. `plan_for()` decides, per
call, whether it runs: `LCP_NATIVE=0` (a public setting: environment variable) switches it off;
the source is built on first use by `torch.utils.cpp_extension` (`$CXX` else `c++`) into a
cache folder (`$LCP_CACHE_DIR`, else `~/.cache/lcp`; a temporary folder if that is not
writable), keyed by the source, the compiler, the flags, PyTorch's version and the CPU; when it
loads, one controlled step is compared with the PyTorch definition. If it cannot be built or
loaded, or the check fails, one warning line says so and the PyTorch definition runs (slower on
CPU, the same results to rounding); `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from lcp.solvers import MeasuredStep

SOURCE = Path(__file__).with_name("dynamics.cpp")
_FLAG_SETS = (
    # -fopenmp: the rows are split over PyTorch's threads (torch.get_num_threads()); the
    # library then shares the OpenMP runtime PyTorch has loaded
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno"],
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"],
    ["-O3", "-fopenmp-simd", "-fno-math-errno"],  # compilers without -march=native
    ["-O2"],
)

_L, _P, _D, _I = ctypes.c_long, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
# every typed pass of dynamics.cpp, as (name, argument types, result type); each exists for
# float32 (`lcp_<name>_f32`) and float64 (`lcp_<name>_f64`)
_SIGNATURES = (
    ("step", [_L] * 4 + [_P] * 8 + [_L, _P, _P, _L] + [_D] * 5 + [_I, _D, _D, _I, _P, _P, _I],
     _D),
    ("free_step", [_L, _L] + [_P] * 5 + [_I], _D),
    ("noisy_step", [_L] * 3 + [_P] * 12 + [_L] + [_P] * 5 + [_D] * 9 + [_I], None),
    ("ebd_residuals", [_L] * 3 + [_P] * 5 + [_L] + [_P] * 3 + [_I], None),
    ("ebd_descend", [_L] * 3 + [_P] * 6 + [_L, _P, _D, _P, _P, _I] + [_D] * 6 + [_I], None),
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

    def get(self, name: str, dtype):
        """The pass `name` (see `_SIGNATURES`) for tensors of `dtype` (torch.float32/64)."""
        return self._functions[name, str(dtype).rpartition(".")[2]]


def threads_for(rows: int, width: int) -> int:
    """How many of PyTorch's threads a compiled pass over `rows` × `width` values uses (one
    for small ones, where starting threads costs more than it saves)."""
    return int(torch.get_num_threads()) if rows * width >= 4096 else 1


def _cpu_features() -> str:
    """The CPU's model and instruction-set flags (what `-march=native` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines()
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


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
    """The built library for this source, compiler and CPU: from the cache, else built there by
    `torch.utils.cpp_extension` (which serialises concurrent builds of one folder)."""
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + " ".join([compiler, *flags, platform.machine(),
                                                 torch.__version__, _cpu_features()]).encode()
                             ).hexdigest()[:16]
        target = _cache_dir() / f"dynamics-{key}.so"
        if target.exists():
            return target
        folder = _cache_dir() / f"build-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        from torch.utils import cpp_extension  # imported only to build: it logs a CUDA line

        # one extension name per build folder: cpp_extension skips a name it has built before
        name = "lcp_dynamics_" + hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        try:
            cpp_extension.load(name=name, sources=[str(SOURCE)],
                               extra_cflags=flags,
                               extra_ldflags=[f for f in flags if "openmp" in f],
                               build_directory=str(folder), is_python_module=False,
                               verbose=False)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {str(exc).strip()[-400:]}")
            continue
        # copy beside the target and rename: concurrent workers never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        shutil.copyfile(folder / f"{name}.so", tmp)
        os.replace(tmp, target)
        return target
    raise RuntimeError("the C++ build failed: " + " | ".join(errors))


def _switched_off() -> bool:
    return os.environ.get("LCP_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _load(compiler: str, cache_dir: str) -> tuple[Kernels | None, str]:
    """(kernels, '') or (None, why): built, loaded and checked once per compiler and cache."""
    if shutil.which(compiler) is None:
        why = f"no C++ compiler ({compiler!r} not found; set CXX)"
    else:
        try:
            lib = Kernels(_build(compiler))
            why = _self_check(lib)
            if not why:
                return lib, ""
        except (RuntimeError, OSError, AttributeError) as exc:
            why = str(exc)
    warnings.warn(f"lcp: the compiled CPU kernels are not in use ({why}); the PyTorch "
                  "definition of the dynamics runs instead (slower on CPU)", RuntimeWarning,
                  stacklevel=3)
    return None, why


def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _loaded() -> tuple[Kernels | None, str]:
    """(kernels, '') or (None, why not), building them on first use."""
    if _switched_off():
        return None, "disabled by LCP_NATIVE=0"
    return _load(_compiler(), os.environ.get("LCP_CACHE_DIR", ""))


def library() -> Kernels | None:
    """The compiled kernels, building them on first use; None where they cannot be had or
    `LCP_NATIVE=0` is set."""
    return _loaded()[0]


def status() -> str:
    """One line: whether the compiled kernels are in use, and why not."""
    lib, why = _loaded()
    if lib is not None:
        return f"compiled kernels in use ({lib.path})"
    return f"compiled kernels not in use: {why}; the PyTorch definition runs"


def summary() -> str:
    """'on', or 'off: <why>' (for run tags and log lines)."""
    lib, why = _loaded()
    return "on" if lib is not None else f"off: {why}"


def _ptr(x):
    return None if x is None else x.data_ptr()


# --------------------------------------------------------------------------- per-batch plan
class Plan:
    """The per-batch constants of a linear-block tanh model that the passes read, and the
    buffers the caller's products write: h_b = h + the blocks' biases in their output
    columns, t = tanh(v), p_v = the blocks' forward products t_in Wᵀ in their output columns,
    p_e = the blocks' transposed products in their input columns (zero where none writes).
    Valid while the weights do not change (one solve)."""

    def __init__(self, model, h: torch.Tensor, lib: Kernels):
        self.lib = lib
        self.batch, self.size = h.shape
        self.r0 = model.readout_start
        h_b = h.detach().clone()
        self.specs, self.weights, weights_t = [], [], []
        for spec, layer in zip(model.block_specs, model.blocks):
            if layer.bias is not None:
                h_b[:, spec.out_start:spec.out_end] += layer.bias.detach()
            self.specs.append(spec)
            self.weights.append(layer.weight.detach())
            # Wᵀ as a contiguous copy: a product with a transposed view costs ~20% more
            weights_t.append(layer.weight.detach().t().contiguous())
        self.h_b = h_b.contiguous()
        self.W_D = model.readout.weight.detach().contiguous()
        self.b_D = model.readout.bias.detach().contiguous()
        self.t = torch.empty_like(h_b)
        self.p_v = torch.zeros_like(h_b)
        self.p_e = torch.zeros_like(h_b)
        t_in = [self.t[:, s.in_start:s.in_end] for s in self.specs]
        self.forward = _products(t_in, weights_t,
                                 [self.p_v[:, s.out_start:s.out_end] for s in self.specs])
        self.threads = threads_for(self.batch, self.size)

    @staticmethod
    def applies(model, h: torch.Tensor) -> bool:
        """ff and rnn (tanh, linear blocks whose input slices do not partly overlap), on CPU,
        float32 or float64."""
        from lcp.models import LinearReadoutModel

        if not (isinstance(model, LinearReadoutModel) and model.activation == "tanh"
                and h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64)
                and all(spec.conv is None for spec in model.block_specs)):
            return False
        regions = sorted({(s.in_start, s.in_end) for s in model.block_specs})
        return all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))

    def back(self, e: torch.Tensor, matrices) -> list:
        """The products e_out M_b into p_e's input columns, for `run_products`."""
        return _products([e[:, s.out_start:s.out_end] for s in self.specs], matrices,
                         [self.p_e[:, s.in_start:s.in_end] for s in self.specs])


def _products(lefts, rights, outs) -> list:
    """(a, b, out, overwrite) per product: the first product into a region overwrites it."""
    seen, products = set(), []
    for a, b, out in zip(lefts, rights, outs):
        key = (out.data_ptr(), out.shape)
        products.append((a, b, out, key not in seen))
        seen.add(key)
    return products


def run_products(products) -> None:
    """For each (a, b, out, overwrite): out = a b (overwrite) or out += a b."""
    for a, b, out, overwrite in products:
        if overwrite:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)


def plan_for(model, h: torch.Tensor) -> Plan | None:
    """The `Plan` of h where the backend applies and is in use, else None."""
    if not Plan.applies(model, h):
        return None
    lib = library()
    return None if lib is None else Plan(model, h, lib)


# --------------------------------------------------------------------------- the free phase
class FreeStep(MeasuredStep):
    """v' = f(h, v) = h_b + Σ_blocks pad(tanh(v)_in Wᵀ) (`Trainer.free_equilibrium`), with its
    stopping error measured by the pass (`lcp.solvers.MeasuredStep`); its states live in two
    buffers it alternates between."""

    def __init__(self, plan: Plan):
        self.plan = plan
        start = plan.h_b.new_zeros(plan.batch, plan.size)
        self.buffers = [start, torch.empty_like(start)]
        self.per_sample = start.new_zeros(plan.batch)
        self.fn = plan.lib.get("free_step", start.dtype)

    def start(self) -> torch.Tensor:
        return self.buffers[0].zero_()

    def measure(self, v: torch.Tensor):
        plan = self.plan
        if v.data_ptr() == self.buffers[0].data_ptr():
            src, dst = self.buffers
        elif v.data_ptr() == self.buffers[1].data_ptr():
            dst, src = self.buffers
        else:  # another solver's iterate
            src, dst = self.buffers[0].copy_(v), self.buffers[1]
        torch.tanh(src, out=plan.t)
        run_products(plan.forward)
        error = self.fn(plan.batch, plan.size, src.data_ptr(), dst.data_ptr(),
                        plan.h_b.data_ptr(), plan.p_v.data_ptr(), self.per_sample.data_ptr(),
                        plan.threads)
        return dst, self.per_sample, error


# --------------------------------------------------------------------- the controlled phase
class ControlledStep(MeasuredStep):
    """`LeastControlTrainer.controlled_step` on one flat state [v | v̂ | uᵢ | e] (B × (2N + 2C)):
    tanh, the blocks' products and one pass, which also measures the vanilla solver's stopping
    error (the per-sample norm over the four concatenated tensors, as on the tuple state).

    Steps write into a ring of `ring` buffers: step k reads the buffer step k − 1 wrote, so a
    solver may keep the last `ring − 1` states (`Solver.keeps`); any other input is copied into
    a spare buffer first. The trainer's `feedback_matrices()` gives the rule's matrices:
    ('transpose', [M_b], M_u) — e' = φ'(v) ⊙ (Σ e_out M_b + u M_u), lcp-di and lcp-kp — or
    ('linear', Qᵀ) — e' = u Qᵀ, lcp-lf.
    """

    def __init__(self, trainer, plan: Plan, onehot: torch.Tensor, ring: int = 2):
        self.plan = plan
        bsz, n, c = plan.batch, plan.size, onehot.shape[1]
        self.rows = (slice(0, n), slice(n, n + c), slice(n + c, n + 2 * c),
                     slice(n + 2 * c, 2 * n + 2 * c))
        self.ring = max(2, int(ring))
        self.block = plan.h_b.new_empty(self.ring + 1, bsz, 2 * n + 2 * c)
        self.buffers = list(self.block)
        self._index = {b.data_ptr(): i for i, b in enumerate(self.buffers)}
        self._last = 0
        self.onehot = onehot.contiguous()
        self.per_sample = plan.h_b.new_zeros(bsz)
        # v of the buffer the last step wrote, contiguous (the pass writes it beside the state):
        # tanh of contiguous rows takes half the time of tanh of the state's strided v
        self._v_copy = plan.h_b.new_empty(bsz, n)
        self._copy_of = -1
        kind, *matrices = trainer.feedback_matrices()
        linear = kind != "transpose"
        if linear:
            self._back = [[] for _ in self.buffers]
            m_u, r_u, p_e = matrices[0].contiguous(), 0, None
        else:
            self._back = [plan.back(b[:, self.rows[3]], matrices[0]) for b in self.buffers]
            m_u, r_u, p_e = matrices[1].contiguous(), plan.r0, plan.p_e
        self._keep = m_u
        self._fn = plan.lib.get("step", plan.h_b.dtype)
        self._shape = (bsz, n, c, 2 * n + 2 * c)
        plain_u = trainer.k_p == 0 and trainer.k_i == 1
        self._args = (_ptr(plan.t), _ptr(self.onehot), _ptr(plan.h_b), _ptr(plan.p_v),
                      _ptr(p_e), _ptr(plan.W_D), int(plan.r0), _ptr(plan.b_D), _ptr(m_u),
                      int(r_u), float(trainer.k_i), float(trainer.k_p),
                      float(1.0 - trainer.dt_u * trainer.alpha), float(trainer.dt_u / bsz),
                      float(-trainer.dt_u / bsz), int(plain_u), float(trainer.dt_v),
                      float(trainer.dt_e), int(linear), _ptr(self.per_sample),
                      _ptr(self._v_copy), plan.threads)

    def start(self) -> torch.Tensor:
        """The zero state (the first buffer)."""
        self._last, self._copy_of = 0, -1
        return self.buffers[0].zero_()

    def measure(self, x: torch.Tensor):
        """One step: (next state, per-sample stopping error, its batch maximum)."""
        plan = self.plan
        i = self._index.get(x.data_ptr())
        if i is None or not x.is_contiguous():
            i = self.ring  # the spare buffer
            self.buffers[i].copy_(x)
        src = self.buffers[i]
        self._last = j = (self._last + 1) % self.ring
        fresh = self._copy_of >= 0 and i == self._copy_of
        torch.tanh(self._v_copy if fresh else src[:, self.rows[0]], out=plan.t)
        self._copy_of = j
        run_products(plan.forward)
        run_products(self._back[i])
        error = self._fn(*self._shape, src.data_ptr(), self.buffers[j].data_ptr(), *self._args)
        return self.buffers[j], self.per_sample, error

    def unpack(self, x: torch.Tensor):
        """(v, v̂, uᵢ, e), contiguous copies."""
        return tuple(x[:, r].contiguous() for r in self.rows)


# ----------------------------------------------------------------------- lcp-lf's noisy phase
class NoisySteps:
    """`LinearFeedbackTrainer.noisy_step` for lcp-lf's noisy phase: per step the noise draw,
    tanh and the blocks' products by PyTorch, the rest in one pass, which writes v_fb and
    u − u_ref into blocks of `chunk` steps so that A −= Σ v_fbᵀ (u − u_ref) is one product per
    block. The same map and the same draws (ξ drawn scaled: normal_(0, s) as s·randn)."""

    def __init__(self, plan: Plan, state, Q: torch.Tensor, onehot, u_ref, rates, chunk: int):
        v, v_hat, u_i, eps = state
        bsz, n, c = plan.batch, plan.size, Q.shape[1]
        self.plan, self.chunk, self.n = plan, chunk, 0
        self.v, self.v_next = v.contiguous().clone(), torch.empty_like(v)
        self.v_hat, self.vh_next = v_hat.contiguous().clone(), torch.empty_like(v_hat)
        self.u_i, self.eps = u_i.contiguous().clone(), eps.contiguous().clone()
        self.xi = torch.empty_like(v)
        self.fb = v.new_empty(chunk * bsz, n)
        self.du = v.new_empty(chunk * bsz, c)
        self.A_sum = torch.zeros_like(Q)
        self._keep = (Q.t().contiguous(), onehot.contiguous(), u_ref.contiguous())
        q_t, onehot_c, u_ref_c = self._keep
        self.noise_scale = rates["noise_scale"]
        self._fn = plan.lib.get("noisy_step", v.dtype)
        fixed = (_ptr(self.u_i), _ptr(self.eps), _ptr(self.xi), _ptr(plan.t), _ptr(plan.p_v),
                 _ptr(plan.h_b), _ptr(q_t), _ptr(plan.W_D), plan.r0, _ptr(plan.b_D),
                 _ptr(onehot_c), _ptr(u_ref_c))
        rates = tuple(float(rates[k]) for k in (
            "k_i", "k_p", "sigma", "eps_keep", "rate_v", "rate_slow_v", "keep_ui",
            "target_rate", "soft_rate")) + (plan.threads,)
        # the pass's arguments by the step's parity (v and v̂ alternate between two buffers) and
        # its place in the block of `chunk` steps
        pairs = [(self.v, self.v_next, self.v_hat, self.vh_next),
                 (self.v_next, self.v, self.vh_next, self.v_hat)]
        self._args = [[(bsz, n, c, *map(_ptr, pair), *fixed, _ptr(self.fb[k * bsz:]),
                        _ptr(self.du[k * bsz:]), *rates) for k in range(chunk)]
                      for pair in pairs]

    def step(self) -> None:
        plan = self.plan
        self.xi.normal_(0.0, self.noise_scale)
        torch.tanh(self.v, out=plan.t)
        run_products(plan.forward)
        self._fn(*self._args[self.n % 2][self.n % self.chunk])
        self.v, self.v_next = self.v_next, self.v
        self.v_hat, self.vh_next = self.vh_next, self.v_hat
        self.n += 1
        if self.n % self.chunk == 0:
            self.A_sum.addmm_(self.fb.t(), self.du, alpha=-1.0)

    def finish(self) -> torch.Tensor:
        """Σ over steps and samples of −v_fbᵀ (u − u_ref)."""
        rows = (self.n % self.chunk) * self.plan.batch
        if rows:
            self.A_sum.addmm_(self.fb[:rows].t(), self.du[:rows], alpha=-1.0)
        return self.A_sum


# ---------------------------------------------------------------------- lcp-ebd's descent
def energy_descent(plan: Plan, x: torch.Tensor, onehot, inv_alpha_b: float, steps: int,
                   adam: bool, lr: float) -> None:
    """`EnergyBasedTrainer.energy_minimum`'s loop on x = [v | v̂] in place: per step tanh and
    the blocks' products by PyTorch; the residuals, ∂E/∂x (`energy_gradient`) and the Adam
    (torch.optim.Adam's arithmetic: betas 0.9, 0.999, eps 1e-8) or gradient-descent step in
    two passes."""
    bsz, n = plan.batch, plan.size
    c = x.shape[1] - n
    residuals = plan.lib.get("ebd_residuals", x.dtype)
    descend = plan.lib.get("ebd_descend", x.dtype)
    r_f = x.new_empty(bsz, n)
    r_d = x.new_empty(bsz, c)
    back = plan.back(r_f, plan.weights)  # Jᵀ r_f before φ'(v)
    onehot_c = onehot.contiguous()
    exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
    res_args = (bsz, n, c, x.data_ptr(), plan.t.data_ptr(), plan.p_v.data_ptr(),
                plan.h_b.data_ptr(), plan.W_D.data_ptr(), plan.r0, plan.b_D.data_ptr(),
                r_f.data_ptr(), r_d.data_ptr(), plan.threads)
    head = (bsz, n, c, x.data_ptr(), plan.t.data_ptr(), r_f.data_ptr(), r_d.data_ptr(),
            plan.p_e.data_ptr(), plan.W_D.data_ptr(), plan.r0, onehot_c.data_ptr(),
            inv_alpha_b, exp_avg.data_ptr(), exp_avg_sq.data_ptr(), int(adam), float(lr),
            0.9, 0.999, 1e-8)
    v = x[:, :n]
    for step in range(1, steps + 1):
        torch.tanh(v, out=plan.t)
        run_products(plan.forward)
        residuals(*res_args)
        run_products(back)
        descend(*head, 1.0 - 0.9 ** step, 1.0 - 0.999 ** step, plan.threads)


# ---------------------------------------------------------------------- the check on load
# The check run when the kernels load: one controlled step against the PyTorch definition,
# `lcp.trainers.lcp_di.check_compiled_step`, which sets itself here when imported (the trainers
# import this module, never the other way round; importing lcp imports the trainers first).
reference_check = None


def _self_check(lib: Kernels) -> str:
    """'' when the kernels agree with the PyTorch definition, else what differs."""
    if reference_check is None:
        return "no check against the PyTorch definition is set (import lcp.trainers)"
    return reference_check(lib)
