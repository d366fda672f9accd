"""lcp-di: the least-control principle with a dynamic-inversion controller.

The controlled state is (v, v̂, uᵢ, e), all zero at start. One explicit-Euler step, every
right-hand side using the old state (SPEC §3):

    g   = ∇_v̂ L(v̂, y)
    u   = k_i·uᵢ − k_p·g
    e'  = e  + dt/τ_e · [ (∂f/∂v)ᵀe − e + (∂D/∂v)ᵀu ]
    v'  = v  + dt/τ_v · [ f(h, v) − v + e ]
    v̂'  = v̂  + dt/τ_v · [ D(v) − v̂ + u ]
    uᵢ' = uᵢ + dt/τ_u · [ −g − α·uᵢ ]

At the controlled equilibrium, with u* = k_i·uᵢ* − k_p·∇L(v̂*) and ṽ = f(h, v*) + e*, the update
is −(∂f(h, v*)/∂θ)ᵀe* for f and E, and −(∂D(ṽ)/∂θ)ᵀu* for D.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lcp.models import LinearReadoutModel, run_products
from lcp.trainers.base import Trainer, loss_gradient


def relax_(out: torch.Tensor, old: torch.Tensor, rate: float) -> torch.Tensor:
    """out ← old + rate·(out − old), i.e. one explicit-Euler step of size `rate` towards `out`
    (nothing to do when rate = 1)."""
    if rate != 1.0:
        out.mul_(rate).add_(old, alpha=1.0 - rate)
    return out


class LeastControlTrainer(Trainer):
    """What lcp-di, lcp-kp and lcp-lf share: the controlled solve, u*, and the update.

    On `LinearReadoutModel`s (ff, rnn, conv-ff) the controlled dynamics run fused
    (`FusedControlled`): the state is one flat tensor [v | v̂ | uᵢ | e] (B × (2N + 2C)), each
    step writes the next state into preallocated buffers with a handful of kernels
    (`DynamicsPlan`), and the per-batch constants (h plus the biases, the one-hot targets) are
    prepared once. It is the same map as `controlled_step`
    (set `fused = False` to run that reference path instead), and the solver's stopping error
    on the flat row is the same per-sample norm over the four concatenated tensors.
    """

    name = "lcp"
    fused = True

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.k_i, self.k_p, self.alpha = cfg.k_i, cfg.k_p, cfg.alpha
        self.dt_v = cfg.dt / cfg.tau_v
        self.dt_u = cfg.dt / cfg.tau_u
        self.dt_e = cfg.dt / cfg.tau_e
        self.controller_solver = cfg.controller_solver
        self.last = None  # this batch's equilibrium, for post_update rules

    def controlled_step(self, h, onehot):
        """The map (v, v̂, uᵢ, e) → next state; subclasses change the e / v rules."""
        model = self.model
        f = model.bind(h)

        def step(v, v_hat, u_i, e):
            g = loss_gradient(v_hat, onehot)
            u = self.k_i * u_i - self.k_p * g
            f_v, jt_e = f.vjp(v, e)
            d_v, dt_u = model.decode_vjp(v, u)
            e_next = e + self.dt_e * (jt_e - e + dt_u)
            v_next = v + self.dt_v * (f_v - v + e)
            v_hat_next = v_hat + self.dt_v * (d_v - v_hat + u)
            u_i_next = u_i + self.dt_u * (-g - self.alpha * u_i)
            return v_next, v_hat_next, u_i_next, e_next

        return step

    # ---------------------------------------------------------------- fused dynamics
    def can_fuse(self) -> bool:
        return self.fused and isinstance(self.model, LinearReadoutModel)

    def fused_feedback_(self, plan, src, dst, u):
        """Write v' and e' of the fused step from slot `src` into slot `dst` (lcp-di: the exact
        transposes), after `plan.act(src.v)`."""
        relax_(plan.implicit_into(dst.v, add=src.e, views=dst.v_out), src.v, self.dt_v)
        relax_(plan.transpose_into(dst.e, src.v, src.e, u, views=src.e_out), src.e, self.dt_e)

    def fused_rule(self):
        """How e' is formed, for the lean fused step: ('transpose', per-block matrices M_b,
        readout matrix M) with e' = φ'(v) ⊙ (Σ e_out M_b + u M) — lcp-di: the weights
        themselves — or ('linear', Mᵀ) with e' = u Mᵀ (lcp-lf). None: use `fused_feedback_`."""
        return ("transpose", [b.weight.detach() for b in self.model.blocks],
                self.model.readout.weight.detach())

    def fused_controlled_step(self, plan, onehot, ring: int = 2):
        """The controlled map as a `FusedControlled` kernel (see there)."""
        return FusedControlled(self, plan, onehot, ring)

    def controller(self):
        """The solver of the controlled phase: `--solver` (the paper's explicit-Euler dynamics
        iterated to their fixed point) unless an accelerated one is chosen."""
        if self.controller_solver == "euler":
            return self.solver
        from lcp.solvers import ControllerSolver

        return ControllerSolver.from_config(self.cfg, self.controller_solver)

    @torch.no_grad()
    def controlled_equilibrium(self, h, y, num_classes):
        h = h.detach()
        onehot = F.one_hot(y, num_classes).to(h.dtype)
        solver = self.controller()
        if self.can_fuse():
            plan = self.batch_plan(h)
            if getattr(solver, "name", "") == "anderson" and hasattr(solver, "memory"):
                kernel = self.fused_controlled_step(plan, onehot, ring=solver.memory + 1)
                x, stats = kernel.anderson(solver.max_iter, solver.threshold, solver.memory,
                                           solver.regulariser)
            else:
                kernel = self.fused_controlled_step(plan, onehot, ring=solver.keeps() + 1)
                (x,), stats = solver(kernel.stepper(), (kernel.start(),), phase="controlled")
            v, v_hat, u_i, e = kernel.unpack(x)
        else:
            v = self.model.zero_state(h)
            zeros_out = h.new_zeros(h.shape[0], num_classes)
            state0 = (v, zeros_out, zeros_out.clone(), torch.zeros_like(v))
            (v, v_hat, u_i, e), stats = solver(self.controlled_step(h, onehot), state0,
                                               phase="controlled", pure=not self.model.decode_has_side_effects())
        u = self.k_i * u_i - self.k_p * loss_gradient(v_hat, onehot)
        return v, v_hat, u_i, e, u, stats

    def implicit_signal(self, v_tilde, e_star):
        """What replaces the gradient reaching ṽ (lcp-di: −e*)."""
        return -e_star

    def compute_update(self, x, y):
        model = self.model
        h = model.encode(x)
        num_classes = model.readout.out_features
        with self.plan_scope():
            v, v_hat, u_i, e, u, stats = self.controlled_equilibrium(h, y, num_classes)
            v_tilde, update_stats = self.least_control_update(h, v, e, u, y,
                                                              self.implicit_signal)
        self.last = {"h": h.detach(), "y": y, "v": v, "v_hat": v_hat, "u_i": u_i, "e": e,
                     "u": u, "v_tilde": v_tilde}
        out = self.solver_stats("controlled", stats)
        out.update(update_stats)
        return out


class DynamicInversionTrainer(LeastControlTrainer):
    name = "lcp-di"


class _Slot:
    """One state buffer [v | v̂ | uᵢ | e] (B × (2N + 2C)) with its views."""

    def __init__(self, plan, rows, buf):
        self.buf = buf
        self.v, self.v_hat, self.u_i, self.e = (self.buf[:, r] for r in rows)
        self.v_out = plan.out_views(self.v)
        self.e_out = plan.out_views(self.e)


class FusedControlled:
    """The controlled map of a `LeastControlTrainer` on a `LinearReadoutModel`, fused.

    The state is one flat tensor [v | v̂ | uᵢ | e] (B × (2N + 2C)), so the solver's per-sample
    stopping error is the norm over the four concatenated tensors, as on the reference path.
    Steps write into a ring of `ring` preallocated buffers whose views are computed once: step
    k reads the buffer step k − 1 wrote, so the solver may keep the last `ring − 1` states it
    was given (`Solver.keeps`). An input that is not one of these buffers (an accelerated
    solver's iterate) is copied into a spare one first.

    One step (every right-hand side from the old state, as `controlled_step`):
        u   = k_i·uᵢ − k_p·g,   g = (softmax(v̂) − onehot)/B
        v'  = v + dt_v·(f(h, v) + e − v)        (lcp-lf: + Q·u instead of e)
        e'  = e + dt_e·(Jᵀe + (∂D/∂v)ᵀu − e)    (lcp-kp: the feedback maps; lcp-lf: Q·u)
        v̂'  = v̂ + dt_v·(D(v) + u − v̂)
        uᵢ' = (dt_u/B)·onehot + (1 − dt_u·α)·uᵢ − (dt_u/B)·softmax(v̂)
    """

    def __init__(self, trainer: LeastControlTrainer, plan, onehot: torch.Tensor, ring: int = 2):
        self.trainer, self.plan = trainer, plan
        n, c, bsz = plan.size, onehot.shape[1], plan.batch
        self.rows = (slice(0, n), slice(n, n + c), slice(n + c, n + 2 * c),
                     slice(n + 2 * c, 2 * n + 2 * c))
        self.ring = max(2, int(ring))
        # the ring's buffers and a spare (for other inputs) in one block of memory; not zeroed:
        # `start` zeroes the first, and a step writes every column of the buffer it fills
        self.block = plan.h_b.new_empty(self.ring + 1, bsz, 2 * n + 2 * c)
        self.slots = [_Slot(plan, self.rows, buf) for buf in self.block]
        self._index = {s.buf.data_ptr(): i for i, s in enumerate(self.slots)}
        self._last = 0
        self.onehot = onehot
        self.target_term = onehot * (trainer.dt_u / bsz)
        self.keep_ui = 1.0 - trainer.dt_u * trainer.alpha
        self.soft_rate = -trainer.dt_u / bsz
        self.batch = bsz

        self._lean = self._build_lean()
        self._native = self._build_native() if self._lean else None

    def _build_lean(self) -> bool:
        """Bind every view and matrix of the step once (linear blocks, non-overlapping
        transposed regions); otherwise `step` calls the plan's general kernels."""
        plan, tr = self.plan, self.trainer
        if any(conv is not None for *_, conv in plan.blocks):
            return False
        rule = tr.fused_rule()
        if rule is None:
            return False
        _, overlapping, writes = plan._scratch_for(rule[0] == "transpose")
        if overlapping:
            return False
        regions = [(spec.in_start, spec.in_end) for spec, *_ in plan.blocks]
        regions.append((plan.r0, plan.size))
        covered = torch.zeros(plan.size, dtype=torch.bool)
        for a, b in regions:
            covered[a:b] = True
        if rule[0] == "transpose" and not bool(covered.all()):
            return False
        self._rule = rule[0]
        firsts = [first for _, first in writes]
        for slot in self.slots:
            slot.fwd = [(target, piece, spec_w[2]) for target, piece, spec_w in
                        zip(slot.v_out, plan._t_in, plan.blocks)]
            # the transposed products are written straight into e' (every column of it is
            # written, the first product of a region overwrites), then scaled by φ'(v) in place
            slot.e_in = [slot.e[:, a:b] for a, b in regions]
        if self._rule == "transpose":
            self._back = list(zip(rule[1], firsts[:-1]))
            self._readout = (rule[2], firsts[-1])
        else:
            self._q_t = rule[1]
        self._unit = (tr.dt_v == 1.0, tr.dt_e == 1.0)
        self._plain_u = tr.k_p == 0 and tr.k_i == 1
        return True

    def _build_native(self):
        """Bind the compiled step of `lcp.native` (CPU, tanh models): one step is then tanh, the
        blocks' large products (into scratch buffers) and one compiled pass — `_native_step`.
        None where it does not apply or cannot be loaded (the lean step runs instead)."""
        plan, tr = self.plan, self.trainer
        lib = plan.native_kernels()
        if lib is None:
            return None
        from lcp import native

        h_b = plan.h_b
        bsz, n, c = plan.batch, plan.size, self.onehot.shape[1]
        self.onehot = self.onehot.contiguous()
        self._per_sample = h_b.new_zeros(bsz)
        # v of the buffer the last step wrote, contiguous (the pass writes it beside the state):
        # tanh of contiguous rows takes half the time of tanh of the state's strided v
        self._v_copy = h_b.new_empty(bsz, n)
        self._copy_of = -1  # the slot whose v `_v_copy` holds
        self._p_v, self._forward = plan.forward_products()
        if self._rule == "transpose":
            # the blocks' transposed products e_out M_b into their input columns; u M_u (the
            # readout's) is added by the compiled pass
            p_e, _, writes = plan._scratch_for(False)
            self._back_native = [(m, target, first)
                                 for (m, _), (target, first) in zip(self._back, writes)]
            # as `run_products` takes them, for each buffer a step may read from
            self._back_of = {id(slot): [(piece, m, target, first) for piece, (m, target, first)
                                        in zip(slot.e_out, self._back_native)]
                             for slot in self.slots}
            m_u, r_u = self._readout[0].contiguous(), plan.r0
        else:
            p_e, self._back_native = None, []  # lcp-lf: e' = u Qᵀ, all in the compiled pass
            self._back_of = {id(slot): [] for slot in self.slots}
            m_u, r_u = self._q_t.contiguous(), 0
        self._keep = (m_u, p_e, h_b.contiguous(), plan.W_D.contiguous(), plan.b_D.contiguous())
        m_u, p_e, h_b, w_d, b_d = self._keep
        ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731
        self._step_fn = lib.get("step", h_b.dtype)
        self._mix_fn = lib.get("anderson_mix", h_b.dtype)
        self._threads = native.threads_for(bsz, n)
        self._shape = (bsz, n, c, 2 * n + 2 * c)
        # the arguments that do not change from step to step
        self._args = (ptr(plan.t), ptr(self.onehot), ptr(h_b), ptr(self._p_v), ptr(p_e),
                      ptr(w_d), int(plan.r0), ptr(b_d), ptr(m_u), int(r_u),
                      float(tr.k_i), float(tr.k_p), float(self.keep_ui), float(tr.dt_u / bsz),
                      float(self.soft_rate), int(self._plain_u), float(tr.dt_v),
                      float(tr.dt_e), int(self._rule != "transpose"), ptr(self._per_sample),
                      ptr(self._v_copy), self._threads)
        self.error = float("nan")  # the stopping error of the last native step
        # one forward and one transposed product (ff, rnn; lcp-di, lcp-kp): run both at once on
        # two threads by PyTorch's own BLAS (lcp_two_products) where it can be reached — with
        # PyTorch on at most two threads; with more, each product keeps all of them
        self._pair = None
        fwd, back = self._forward, self._back_native
        if (lib.blas and torch.get_num_threads() <= 2 and len(fwd) == 1 and len(back) == 1
                and fwd[0][3] and back[0][2]
                and fwd[0][1].is_contiguous() and back[0][0].is_contiguous()):
            (t_in, w_t, p_v_out, _), (m, p_e_in, _) = fwd[0], back[0]
            head = (bsz, w_t.shape[1], w_t.shape[0], t_in.data_ptr(), t_in.stride(0),
                    w_t.data_ptr(), w_t.stride(0), p_v_out.data_ptr(), p_v_out.stride(0))
            self._pair_fn = lib.get("two_products", h_b.dtype)
            # per source buffer: its e_out @ M into p_e's input columns
            self._pair = {}
            for slot in self.slots:
                e_out = slot.e_out[0]
                self._pair[id(slot)] = head + (
                    bsz, m.shape[1], m.shape[0], e_out.data_ptr(), e_out.stride(0),
                    m.data_ptr(), m.stride(0), p_e_in.data_ptr(), p_e_in.stride(0),
                    self._threads)
        return lib

    def _native_step(self, x: torch.Tensor):
        """`_lean_step` as tanh, the blocks' large products and one compiled pass
        (`lcp.native`), which also leaves the vanilla solver's per-sample stopping error of this
        step in `_per_sample` and its maximum in `error`."""
        plan = self.plan
        i = self._index.get(x.data_ptr())
        src = self.slots[i] if i is not None and x.is_contiguous() else self._source(x)
        self._last = j = (self._last + 1) % self.ring
        dst = self.slots[j]
        fresh = self._copy_of >= 0 and src is self.slots[self._copy_of]
        torch.tanh(self._v_copy if fresh else src.v, out=plan.t)
        self._copy_of = j
        if self._pair is not None:
            self._pair_fn(*self._pair[id(src)])
        else:
            run_products(self._forward)
            run_products(self._back_of[id(src)])
        self.error = self._step_fn(*self._shape, src.buf.data_ptr(), dst.buf.data_ptr(),
                                   *self._args)
        return (dst.buf,)

    def measure(self, x: torch.Tensor):
        """One step and its stopping error: (next state, per-sample error, batch maximum) —
        what `lcp.solvers.vanilla` computes after the step (l2 metric), measured by the
        compiled pass that wrote the state."""
        (y,) = self._native_step(x)
        return y, self._per_sample, self.error

    def stepper(self):
        """The step function to hand to a solver: `step`, which the vanilla solver calls through
        `measure` when the compiled kernels are in use (`lcp.solvers.MeasuredStep`)."""
        if self._native is None:
            return self.step
        from lcp.solvers import MeasuredStep

        return MeasuredStep(self.step, self.measure)

    def start(self) -> torch.Tensor:
        """The zero state (the first buffer)."""
        self._last = 0
        self._copy_of = -1
        return self.slots[0].buf.zero_()

    def _source(self, x: torch.Tensor) -> _Slot:
        i = self._index.get(x.data_ptr())
        if i is not None and x.is_contiguous():
            return self.slots[i]
        spare = self.slots[-1]
        spare.buf.copy_(x)
        return spare

    def step(self, x: torch.Tensor):
        if self._native is not None:
            return self._native_step(x)
        if self._lean:
            return self._lean_step(x)
        tr, plan = self.trainer, self.plan
        src = self._source(x)
        self._last = (self._last + 1) % self.ring
        dst = self.slots[self._last]
        soft = plan.softmax(src.v_hat)
        if tr.k_p == 0:
            u = src.u_i if tr.k_i == 1 else src.u_i * tr.k_i
        else:
            u = tr.k_i * src.u_i - tr.k_p * ((soft - self.onehot) / self.batch)
        plan.act(src.v)
        tr.fused_feedback_(plan, src, dst, u)
        relax_(plan.decode_into(dst.v_hat, add=u), src.v_hat, tr.dt_v)
        torch.add(self.target_term, src.u_i, alpha=self.keep_ui, out=dst.u_i).add_(
            soft, alpha=self.soft_rate)
        return (dst.buf,)

    def _lean_step(self, x: torch.Tensor):
        """`step` with every view and matrix bound in advance (the same operations)."""
        tr, plan = self.trainer, self.plan
        i = self._index.get(x.data_ptr())
        src = self.slots[i] if i is not None and x.is_contiguous() else self._source(x)
        self._last = j = (self._last + 1) % self.ring
        dst = self.slots[j]
        soft = plan.softmax(src.v_hat)
        if self._plain_u:
            u = src.u_i
        else:
            u = tr.k_i * src.u_i - tr.k_p * ((soft - self.onehot) / self.batch)
        plan.act(src.v)
        unit_v, unit_e = self._unit
        if self._rule == "transpose":
            torch.add(plan.h_b, src.e, out=dst.v)
            for target, piece, weight_t in dst.fwd:
                target.addmm_(piece, weight_t)
            for piece, (m, first), target in zip(src.e_out, self._back, dst.e_in):
                if first:
                    torch.mm(piece, m, out=target)
                else:
                    target.addmm_(piece, m)
            m, first = self._readout
            if first:
                torch.mm(u, m, out=dst.e_in[-1])
            else:
                dst.e_in[-1].addmm_(u, m)
            plan.act_grad_mul_into(dst.e, dst.e, src.v)
            if not unit_e:
                relax_(dst.e, src.e, tr.dt_e)
        else:
            torch.mm(u, self._q_t, out=dst.e)
            torch.add(plan.h_b, dst.e, out=dst.v)
            for target, piece, weight_t in dst.fwd:
                target.addmm_(piece, weight_t)
        if not unit_v:
            relax_(dst.v, src.v, tr.dt_v)
        torch.add(u, plan.b_D, out=dst.v_hat).addmm_(plan._t_r, plan.W_D_t)
        if not unit_v:
            relax_(dst.v_hat, src.v_hat, tr.dt_v)
        torch.add(self.target_term, src.u_i, alpha=self.keep_ui, out=dst.u_i).add_(
            soft, alpha=self.soft_rate)
        return (dst.buf,)

    def anderson(self, max_iter: int, threshold: float, memory: int = 5,
                 regulariser: float = 1e-6, phase: str = "controlled"):
        """The controlled fixed point by Anderson acceleration, on this kernel's buffers.

        As `lcp.solvers.anderson_joint` (one set of mixing weights for the batch, regulariser
        relative to the Gram matrix, stop at the first iterate x whose step error
        ‖F(x) − x‖/(1e-5 + ‖x‖) per sample is below `threshold`, return F(x)), with two
        economies: the last `memory` outputs F(x) stay in the kernel's ring (build the kernel
        with ring = memory + 1) and the mixed iterate is written straight into the spare buffer,
        so no state is copied; and the mixing weights are fitted on the controller block
        (v̂, uᵢ) of the residuals — the slow part of these dynamics — which is as fast to
        converge as fitting on the whole state and costs nothing. Returns (F(x), SolverStats).
        """
        from lcp.solvers import SolverStats, _check_finite

        bsz = self.batch
        ring = self.ring
        m = min(int(memory), ring - 1)
        outputs = self.block[:ring].view(ring, -1).t()  # the ring's buffers, as columns
        x = self.slots[-1].buf.zero_()  # the iterate lives in the spare buffer
        small = slice(self.rows[1].start, self.rows[2].stop)
        G = x.new_empty(m, (small.stop - small.start) * bsz)  # controller-block residuals
        gram = np.zeros((m, m))
        eye = np.eye(m)
        ones = np.ones(m)
        slot_of_row = np.zeros(m, dtype=np.int64)  # the ring buffer holding F(x) of G's row
        w = np.zeros(ring)
        weights = torch.zeros(ring, dtype=x.dtype, device=x.device)
        diff = torch.empty_like(x)
        trace: list[float] = []
        per_sample = None
        filled, row = 0, -1
        measured = self._native is not None
        for it in range(1, max_iter + 1):
            if measured:  # the compiled pass measured ‖F(x) − x‖/(1e-5 + ‖x‖) per sample
                fx, per_sample, value = self.measure(x)
            else:
                (fx,) = self.step(x)
                per_sample = (torch.linalg.vector_norm(torch.sub(fx, x, out=diff), dim=1)
                              / (torch.linalg.vector_norm(x, dim=1) + 1e-5))
                value = per_sample.max().item()
            trace.append(value)
            _check_finite(value, phase, it)
            if value < threshold:
                return fx, SolverStats(it, value, True, max_iter, per_sample.clone(), trace)
            row = (row + 1) % m
            filled = min(filled + 1, m)
            slot_of_row[row] = self._last
            if measured:  # the rest of the update in one compiled call, the same arithmetic
                if not self._mix_fn(bsz, fx.shape[1], small.start, small.stop, fx.data_ptr(),
                                    x.data_ptr(), G.data_ptr(), m, filled, row,
                                    gram.ctypes.data, float(regulariser),
                                    slot_of_row.ctypes.data, self.block.data_ptr(),
                                    self._threads):
                    x.copy_(fx)  # a singular system: take the plain step, restart the history
                    gram[:] = 0.0
                    filled, row = 0, -1
                continue
            G[row].view(bsz, -1).copy_(diff[:, small])
            products = torch.mv(G[:filled], G[row]).cpu().numpy()
            gram[row, :filled] = products
            gram[:filled, row] = products
            A = gram[:filled, :filled]
            A = A + (regulariser * max(A.diagonal().max(), 1e-300)) * eye[:filled, :filled]
            try:
                a = np.linalg.solve(A, ones[:filled])
                total = float(a.sum())
            except np.linalg.LinAlgError:
                total = float("nan")
            if not np.isfinite(total) or abs(total) < 1e-300:
                x.copy_(fx)  # a singular system: take the plain step, restart the history
                gram[:] = 0.0
                filled, row = 0, -1
                continue
            # x ← Σ aᵢ F(xᵢ): one matrix–vector product over the ring's buffers
            w[:] = 0.0
            w[slot_of_row[:filled]] = a / total
            weights.copy_(torch.from_numpy(w))
            torch.mv(outputs, weights, out=x.view(-1))
        return fx, SolverStats(max_iter, trace[-1], False, max_iter, per_sample.clone(), trace)

    def unpack(self, x: torch.Tensor):
        """(v, v̂, uᵢ, e), contiguous copies."""
        return tuple(x[:, r].contiguous() for r in self.rows)
