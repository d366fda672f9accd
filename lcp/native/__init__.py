"""The accelerated CPU backend of the no-grad dynamics (`dynamics.cpp`), one pass per equation
(docs/equations.md names each one's PyTorch definition; docs/speed.md says why and how).

On the linear-block tanh models (ff, rnn) on CPU, a step of the controlled dynamics
(lcp-di/kp/lf), of the free phase, of lcp-lf's noisy phase and of lcp-ebd's descent is tanh and
the blocks' large matrix products (PyTorch's kernels) plus one or two passes of `dynamics.cpp`
that do everything else, including the solver's stopping error. `plan_for()` decides, per
call, whether it runs: `LCP_NATIVE=0` (a public setting: environment variable) switches it off;
the source is built on first use by `torch.utils.cpp_extension` (`$CXX` else `c++`) into a
cache folder (`$LCP_CACHE_DIR`, else `~/.cache/lcp`; a temporary folder if that is not
writable), keyed by the sources, the compiler, the flags, PyTorch's version and the CPU.

Each pass is bound (`bindings.cpp`) as one typed function of tensors (`Kernels.get(name)`, the
names in `PASSES`), dispatched on the tensors' dtype, that checks every tensor's dtype, device,
contiguity and shape before it runs and raises TypeError or ValueError naming the argument;
Python never handles a pointer. `load(check)` builds and loads the kernels and runs `check` on
them, once per compiler and cache folder: the caller owns the check because it owns the
passes' PyTorch definitions (the trainers: `lcp.trainers.native_check` compares every pass, in
float64 and float32, with its definition), so this package imports nothing that uses it. A pass
that differs (or raises) is turned off alone: one warning line names it and the callers that
need it run the PyTorch definition of their phase (lcp-ebd's descent needs both of its passes);
the other passes stay in use. If the source cannot be built or loaded, or no pass agrees with
its definition, one warning line says so and the PyTorch definition runs everywhere (slower on
CPU, the same results to rounding). `lcp.trainers.native_check.status()` says which is in use
and why.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from lcp.solvers import MeasuredStep

_HERE = Path(__file__).parent
# the passes (dynamics.cpp), their declarations and their typed bindings: all in the cache key
SOURCES = (_HERE / "dynamics.cpp", _HERE / "bindings.cpp")
HEADERS = (_HERE / "dynamics.h",)
# the module name bindings.cpp gives itself (PYBIND11_MODULE), whatever file it was copied to
MODULE_NAME = "lcp_dynamics"
_FLAG_SETS = (
    # -fopenmp: the rows are split over PyTorch's threads (torch.get_num_threads()); the
    # library then shares the OpenMP runtime PyTorch has loaded
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno"],
    ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"],
    ["-O3", "-fopenmp-simd", "-fno-math-errno"],  # compilers without -march=native
    ["-O2"],
)

# every pass the bindings export (each for float32 and float64 tensors), in the order the load
# check runs them
PASSES = ("step", "free_step", "noisy_step", "ebd_residuals", "ebd_descend")
# loops of many steps that run a pass of PASSES in one call (in use where their pass is)
LOOPS = ("noisy_steps",)


class Kernels:
    """The loaded extension: `get(name)` is the typed binding of the pass `name` (see `PASSES`);
    `off` maps each pass the load check turned off to why (`uses(*names)`: none of them is)."""

    def __init__(self, path: Path):
        self.path = path
        loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(MODULE_NAME,
                                                                                 loader))
        loader.exec_module(module)
        self.module = module
        self.functions = {name: getattr(module, name) for name in PASSES + LOOPS}
        self.off: dict[str, str] = {}

    def get(self, name: str):
        """The binding of the pass `name`: a function of tensors (all float32 or all float64,
        on the CPU, contiguous) and typed scalars."""
        return self.functions[name]

    def uses(self, *names: str) -> bool:
        """Whether every pass in `names` is in use (none was turned off by the load check)."""
        unknown = [name for name in names if name not in self.functions]
        if unknown:
            raise ValueError(f"no compiled pass {unknown[0]!r}; the passes: {', '.join(PASSES)}")
        return not any(name in self.off for name in names)


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
    """The built extension for these sources, compiler and CPU: from the cache, else built there
    by `torch.utils.cpp_extension` (which serialises concurrent builds of one folder)."""
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
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

        # one extension name per build folder: cpp_extension skips a name it has built before.
        # Built as a plain library (is_python_module=False): `Kernels` imports the cached copy
        # as the module MODULE_NAME that bindings.cpp defines
        name = "lcp_dynamics_" + hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        try:
            cpp_extension.load(name=name, sources=[str(path) for path in SOURCES],
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


# a load check: {pass: what differs from its PyTorch definition} for each pass of the kernels
# that fails it (or raises), empty when every pass agrees
Check = Callable[[Kernels], dict[str, str]]


@functools.lru_cache(maxsize=None)
def _load(compiler: str, cache_dir: str, check: Check) -> tuple[Kernels | None, str]:
    """(kernels, '') or (None, why): built, loaded and checked once per compiler, cache and
    check. A pass that fails `check` is turned off alone (`Kernels.off`, one warning line
    each); the kernels are not used at all when every pass fails."""
    if shutil.which(compiler) is None:
        why = f"no C++ compiler ({compiler!r} not found; set CXX)"
    else:
        try:
            lib = Kernels(_build(compiler))
        except (RuntimeError, OSError, ImportError, AttributeError) as exc:
            why = str(exc)
        else:
            failed = check(lib)
            if len(failed) < len(PASSES):
                lib.off = dict(failed)
                for name, reason in failed.items():
                    warnings.warn(f"lcp: the compiled pass {name} is not in use ({reason}); its "
                                  "PyTorch definition runs instead (slower on CPU)",
                                  RuntimeWarning, stacklevel=4)
                return lib, ""
            why = "no pass agrees with its PyTorch definition: " + "; ".join(
                f"{name}: {reason}" for name, reason in failed.items())
    warnings.warn(f"lcp: the compiled CPU kernels are not in use ({why}); the PyTorch "
                  "definition of the dynamics runs instead (slower on CPU)", RuntimeWarning,
                  stacklevel=4)
    return None, why


def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def load(check: Check) -> tuple[Kernels | None, str]:
    """(kernels, '') or (None, why not): the kernels built on first use, and every pass checked
    by `check` before they are handed out (once per compiler, cache folder and check; the passes
    that fail it are off, `Kernels.off`); `LCP_NATIVE=0` switches them off. This is the one way
    to the kernels, so none is used unchecked: whoever asks for them brings the check, which
    knows the passes' PyTorch definitions (`lcp.trainers.native_check`)."""
    if _switched_off():
        return None, "disabled by LCP_NATIVE=0"
    return _load(_compiler(), os.environ.get("LCP_CACHE_DIR", ""), check)


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


def plan_for(model, h: torch.Tensor, library: Callable[[], Kernels | None] | None,
             *passes: str) -> Plan | None:
    """The `Plan` of h where the backend applies and the kernels `library()` gives (None: not in
    use) run every pass in `passes` (of `PASSES`: those the caller's phase runs), else None: the
    caller then runs the PyTorch definition. `library` is called only where the backend
    applies (it may build and check the kernels); None runs the definition."""
    if library is None or not Plan.applies(model, h):
        return None
    lib = library()
    return None if lib is None or not lib.uses(*passes) else Plan(model, h, lib)


# --------------------------------------------------------------------------- the free phase
class FreeStep(MeasuredStep):
    """v' = f(h, v) = h_b + Σ_blocks pad(tanh(v)_in Wᵀ) (`Trainer.free_equilibrium`), with its
    stopping error measured by the pass (`lcp.solvers.MeasuredStep`); its states live in two
    buffers it alternates between."""

    passes = ("free_step",)

    def __init__(self, plan: Plan):
        self.plan = plan
        start = plan.h_b.new_zeros(plan.batch, plan.size)
        self.buffers = [start, torch.empty_like(start)]
        self.per_sample = start.new_zeros(plan.batch)
        self.fn = plan.lib.get("free_step")

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
        error = self.fn(src, dst, plan.h_b, plan.p_v, self.per_sample, plan.threads)
        return dst, self.per_sample, error


# --------------------------------------------------------------------- the controlled phase
class ControlledStep(MeasuredStep):
    """`LeastControlTrainer.controlled_step` on one flat state [v | v̂ | uᵢ | e] (B × (2N + 2C)):
    the blocks' products and one pass, which also measures the vanilla solver's stopping error
    (the per-sample norm over the four concatenated tensors, as on the tuple state) and writes
    tanh(v′) for the next step's products (PyTorch's tanh runs only on a state no pass wrote).

    Steps write into a ring of `ring` buffers: step k reads the buffer step k − 1 wrote, so a
    solver may keep the last `ring − 1` states (`Solver.keeps`); any other input is copied into
    a spare buffer first. The trainer's `feedback_matrices()` gives the rule's matrices:
    ('transpose', [M_b], M_u) — e' = φ'(v) ⊙ (Σ e_out M_b + u M_u), lcp-di and lcp-kp — or
    ('linear', Qᵀ) — e' = u Qᵀ, lcp-lf.
    """

    passes = ("step",)

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
        # the buffer whose tanh(v) the last pass wrote into t (−1: none; PyTorch's tanh then)
        self._tanh_of = -1
        kind, *matrices = trainer.feedback_matrices()
        linear = kind != "transpose"
        if linear:
            self._back = [[] for _ in self.buffers]
            m_u, r_u, p_e = matrices[0].contiguous(), 0, None
        else:
            self._back = [plan.back(b[:, self.rows[3]], matrices[0]) for b in self.buffers]
            m_u, r_u, p_e = matrices[1].contiguous(), plan.r0, plan.p_e
        self._keep = m_u
        self._fn = plan.lib.get("step")
        plain_u = trainer.k_p == 0 and trainer.k_i == 1
        # the pass's arguments after (src, dst), in the binding's order (bindings.cpp, `step`)
        self._args = (plan.t, self.onehot, plan.h_b, plan.p_v, p_e, plan.W_D, int(plan.r0),
                      plan.b_D, m_u, int(r_u), float(trainer.k_i), float(trainer.k_p),
                      float(1.0 - trainer.dt_u * trainer.alpha), float(trainer.dt_u / bsz),
                      float(-trainer.dt_u / bsz), bool(plain_u), float(trainer.dt_v),
                      float(trainer.dt_e), bool(linear), self.per_sample, True, plan.threads)

    def start(self) -> torch.Tensor:
        """The zero state (the first buffer)."""
        self._last, self._tanh_of = 0, -1
        return self.buffers[0].zero_()

    def measure(self, x: torch.Tensor):
        """One step: (next state, per-sample stopping error, its batch maximum)."""
        i = self._index.get(x.data_ptr())
        if i is None or not x.is_contiguous():
            i = self.ring  # the spare buffer
            self.buffers[i].copy_(x)
        self._last = j = (self._last + 1) % self.ring
        if i != self._tanh_of:  # else the last pass wrote tanh(v) of this very state
            self.tanh(i)
        self.products()
        self.back_products(i)
        error = self.run_pass(i, j)
        return self.buffers[j], self.per_sample, error

    # the pieces of a step from buffer i into buffer j, in its order (benchmarks/loop_profile.py
    # times each alone)
    def tanh(self, i: int) -> None:
        """t = tanh(v) of buffer i by PyTorch (a state no pass wrote)."""
        torch.tanh(self.buffers[i][:, self.rows[0]], out=self.plan.t)

    def products(self) -> None:
        """The blocks' forward products of t."""
        run_products(self.plan.forward)

    def back_products(self, i: int) -> None:
        """The blocks' transposed products of e of buffer i (none for lcp-lf's rule)."""
        run_products(self._back[i])

    def run_pass(self, i: int, j: int) -> float:
        """The pass from buffer i into buffer j (and tanh(v′) into t): the batch's worst
        stopping error."""
        self._tanh_of = j
        return self._fn(self.buffers[i], self.buffers[j], *self._args)

    def unpack(self, x: torch.Tensor):
        """(v, v̂, uᵢ, e), contiguous copies."""
        return tuple(x[:, r].contiguous() for r in self.rows)


# ----------------------------------------------------------------------- lcp-lf's noisy phase
class NoisySteps:
    """`LinearFeedbackTrainer.noisy_step` for lcp-lf's noisy phase: per step the blocks'
    products by PyTorch, the rest in one pass, which also writes tanh of the next state for the
    next step's products (PyTorch's `tanh` once, for the first), and v_fb and u − u_ref into
    blocks of `chunk` steps so that A −= Σ v_fbᵀ (u − u_ref) is one product per block. The same
    map and the same draws: with `noise_key` None, ξ from PyTorch's generator (drawn scaled:
    normal_(0, s) as s·randn); with a key, the pass computes `lcp.noise.counter_normal(key,
    step)` itself, on every thread. `rates`: `LinearFeedbackTrainer.noisy_rates()`."""

    passes = ("noisy_step",)

    def __init__(self, plan: Plan, state, Q: torch.Tensor, onehot, u_ref, rates, chunk: int,
                 noise_key: int | None = None):
        v, v_hat, u_i, eps = state
        bsz, n, c = plan.batch, plan.size, Q.shape[1]
        self.plan, self.chunk, self.n = plan, chunk, 0
        self.v, self.v_next = v.contiguous().clone(), torch.empty_like(v)
        self.v_hat, self.vh_next = v_hat.contiguous().clone(), torch.empty_like(v_hat)
        self.u_i, self.eps = u_i.contiguous().clone(), eps.contiguous().clone()
        self.xi = torch.empty_like(v)
        self.fb = v.new_empty(chunk * bsz, n)
        self.du = v.new_empty(chunk * bsz, c)
        # Aᵀ (C × N): its block product du_blockᵀ fb_block costs MKL half as much as A's
        self.A_sum_t = Q.new_zeros(c, n)
        q_t, onehot_c, u_ref_c = Q.t().contiguous(), onehot.contiguous(), u_ref.contiguous()
        self.noise_scale = rates["noise_scale"]
        self._fn = plan.lib.get("noisy_step")
        self._loop = plan.lib.get("noisy_steps")
        self.buffers = (self.v, self.v_next, self.v_hat, self.vh_next)  # in step 0's order
        fixed = (self.u_i, self.eps, self.xi, plan.t, plan.p_v, plan.h_b, q_t, plan.W_D,
                 int(plan.r0), plan.b_D, onehot_c, u_ref_c)
        # u_i's update: (dt'_u/B) onehot + (1 − dt'_u α) u_i − (dt'_u/B) softmax
        scalars = tuple(float(rates[k]) for k in (
            "k_i", "k_p", "sigma", "eps_keep", "rate_v", "rate_slow_v", "keep_ui")) + (
            float(rates["rate_u"] / bsz), float(-rates["rate_u"] / bsz), plan.threads, True,
            noise_key is not None, 0 if noise_key is None else int(noise_key),
            float(self.noise_scale))
        self.counter_noise = noise_key is not None
        self._fixed, self._scalars = fixed, scalars
        torch.tanh(self.v, out=plan.t)  # later steps' tanh: written by the pass
        # the pass's arguments (bindings.cpp, `noisy_step`) by the step's parity (v and v̂
        # alternate between two buffers) and its place in the block of `chunk` steps
        pairs = [(self.v, self.v_next, self.v_hat, self.vh_next),
                 (self.v_next, self.v, self.vh_next, self.v_hat)]
        self._args = [[(*pair, *fixed, self.fb[k * bsz:(k + 1) * bsz],
                        self.du[k * bsz:(k + 1) * bsz], *scalars) for k in range(chunk)]
                      for pair in pairs]

    def run(self, steps: int) -> None:
        """`steps` steps in one call of the compiled loop (`noisy_steps`): `step`'s draws,
        products, passes and A's blocks, in its order, without a return to Python per step."""
        if steps <= 0:
            return
        self._loop(self.n, steps, self.plan.forward, *self.buffers, *self._fixed, self.fb,
                   self.du, self.A_sum_t, self.chunk, *self._scalars)
        self.n += steps
        if steps % 2:
            self.v, self.v_next = self.v_next, self.v
            self.v_hat, self.vh_next = self.vh_next, self.v_hat

    def step(self) -> None:
        self.draw()
        self.products()
        self.run_pass()
        self.v, self.v_next = self.v_next, self.v
        self.v_hat, self.vh_next = self.vh_next, self.v_hat
        self.n += 1
        if self.n % self.chunk == 0:
            self.accumulate()

    # the pieces of a step, in its order (benchmarks/loop_profile.py times each alone)
    def draw(self) -> None:
        """ξ from PyTorch's generator (lf_noise=paper; the counter noise is the pass's)."""
        if not self.counter_noise:
            self.xi.normal_(0.0, self.noise_scale)

    def products(self) -> None:
        """The blocks' forward products of t = tanh(v)."""
        run_products(self.plan.forward)

    def run_pass(self, next_tanh: bool = True, noise: bool = True) -> None:
        """The pass: v′, v̂′, uᵢ, ε, the step's v_fb and u − u_ref, and tanh(v′) into t. For
        the loop profile's parts of the pass: `next_tanh=False` leaves tanh(v′) out, `noise=False`
        the counter noise (ξ is then read from `xi`)."""
        args = self._args[self.n % 2][self.n % self.chunk]
        if not (next_tanh and noise):  # the flags next_tanh, counter_noise: 4th and 3rd last
            args = args[:-4] + (next_tanh and args[-4], noise and args[-3]) + args[-2:]
        self._fn(*args, self.n)

    def accumulate(self) -> None:
        """A −= Σ v_fbᵀ (u − u_ref) over the block of `chunk` steps just ended."""
        self.A_sum_t.addmm_(self.du.t(), self.fb, alpha=-1.0)

    def state(self) -> tuple:
        """(v, v̂, uᵢ, ε) after the steps so far (the buffers themselves)."""
        return self.v, self.v_hat, self.u_i, self.eps

    def finish(self) -> torch.Tensor:
        """Σ over steps and samples of −v_fbᵀ (u − u_ref)."""
        rows = (self.n % self.chunk) * self.plan.batch
        if rows:
            self.A_sum_t.addmm_(self.du[:rows].t(), self.fb[:rows], alpha=-1.0)
        return self.A_sum_t.t().contiguous()


# ---------------------------------------------------------------------- lcp-ebd's descent
class EnergyDescent:
    """`EnergyBasedTrainer.energy_minimum`'s loop on x = [v | v̂] in place: per step the blocks'
    forward products of t = tanh(v) by PyTorch and the residuals pass (`residuals`: r_f, r_d, as
    `EnergyBasedTrainer.residuals`), then the blocks' transposed products of r_f by PyTorch and
    the descent pass (`descend`: ∂E/∂x as `energy_gradient`, and the Adam step — torch.optim.Adam's
    arithmetic: betas 0.9, 0.999, eps 1e-8 — or the gradient-descent step), which also writes
    tanh(v′) into t for the next step (PyTorch's tanh only before the first step)."""

    passes = ("ebd_residuals", "ebd_descend")

    def __init__(self, plan: Plan, x: torch.Tensor, onehot, inv_alpha_b: float, adam: bool,
                 lr: float):
        bsz, n = plan.batch, plan.size
        c = x.shape[1] - n
        self.plan, self.x = plan, x
        self.v = x[:, :n]
        self._residuals = plan.lib.get("ebd_residuals")
        self._descend = plan.lib.get("ebd_descend")
        self.r_f = x.new_empty(bsz, n)
        self.r_d = x.new_empty(bsz, c)
        self._back = plan.back(self.r_f, plan.weights)  # Jᵀ r_f before φ'(v)
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
        # the passes' arguments (bindings.cpp, `ebd_residuals` and `ebd_descend`)
        self._res_args = (x, plan.t, plan.p_v, plan.h_b, plan.W_D, int(plan.r0), plan.b_D,
                          self.r_f, self.r_d, plan.threads)
        self._head = (x, plan.t, self.r_f, self.r_d, plan.p_e, plan.W_D, int(plan.r0),
                      onehot.contiguous(), float(inv_alpha_b), self.exp_avg, self.exp_avg_sq,
                      bool(adam), float(lr), 0.9, 0.999, 1e-8)
        # whether t holds tanh(v) of x as it is (the last descent pass wrote it); x is written
        # only by the descent pass while this loop runs
        self._t_fresh = False

    def residuals(self) -> None:
        """t = tanh(v) unless the last descent pass wrote it, the forward products, then r_f
        and r_d (`self.r_f`, `self.r_d`)."""
        if not self._t_fresh:
            self.tanh()
        self.products()
        self.residual_pass()

    def descend(self, step: int) -> None:
        """Step `step` (from 1) of the descent from `t`, `r_f` and `r_d`."""
        self.back_products()
        self.descent_pass(step)

    # the pieces of a step, in its order (benchmarks/loop_profile.py times each alone)
    def tanh(self) -> None:
        torch.tanh(self.v, out=self.plan.t)

    def products(self) -> None:
        """The blocks' forward products of t."""
        run_products(self.plan.forward)

    def residual_pass(self) -> None:
        """r_f and r_d."""
        self._residuals(*self._res_args)

    def back_products(self) -> None:
        """The blocks' transposed products of r_f."""
        run_products(self._back)

    def descent_pass(self, step: int) -> None:
        """∂E/∂x and the Adam (or gradient-descent) step `step` (from 1) on x; t = tanh(v′)."""
        self._descend(*self._head, 1.0 - 0.9 ** step, 1.0 - 0.999 ** step, True,
                      self.plan.threads)
        self._t_fresh = True

    def run(self, steps: int) -> None:
        for step in range(1, steps + 1):
            self.residuals()
            self.descend(step)


def energy_descent(plan: Plan, x: torch.Tensor, onehot, inv_alpha_b: float, steps: int,
                   adam: bool, lr: float) -> None:
    """`steps` steps of `EnergyDescent` on x in place."""
    EnergyDescent(plan, x, onehot, inv_alpha_b, adam, lr).run(steps)
