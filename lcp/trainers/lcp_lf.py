"""lcp-lf: least control with a fixed-rule linear feedback Q (N × C) (docs/equations.md,
"Controlled dynamics" and "lcp-lf").

Q is not trained by the optimizer: after each batch's update, `post_update` runs a noisy phase
from the controlled equilibrium and moves Q by its local rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lcp import native
from lcp.errors import DivergenceError, LcpError
from lcp.models import LinearReadoutModel
from lcp.noise import counter_normal, draw_key
from lcp.trainers.base import loss_gradient
from lcp.trainers.lcp_di import LeastControlTrainer


class LinearFeedbackTrainer(LeastControlTrainer):
    name = "lcp-lf"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if not isinstance(model, LinearReadoutModel):
            raise LcpError(f"lcp-lf needs a flat-state model (ff, rnn, conv-ff), not {model.name}")
        device = next(model.parameters()).device
        n, c = model.state_size, model.num_classes
        self.auxiliary.register_buffer("Q", torch.randn(n, c, device=device) / math.sqrt(c))

    @property
    def Q(self) -> torch.Tensor:
        return self.auxiliary.Q

    def feedback(self, f, v, e, u):
        """e' = Q·u, which also drives v'."""
        e_next = u @ self.Q.t()
        return e_next, e_next

    def feedback_matrices(self):
        return "linear", self.Q.t()

    def implicit_signal(self, v_tilde, e_star):
        return -e_star * self.model.act_grad(v_tilde)

    @torch.no_grad()
    def post_update(self):
        """Q ← Q + dt/τ_Q · (mean_batch A − wd_Q·Q), A from the noisy phase of this batch."""
        if self.last is None:
            return
        A_mean, steps = self.noisy_phase(self.last)
        self.last_noisy_steps = steps
        self.Q.add_(self.cfg.dt / self.cfg.tau_Q * (A_mean - self.cfg.wd_Q * self.Q))

    def rule_updated_tensors(self):
        return [self.Q]

    def noisy_rates(self) -> dict[str, float]:
        """The constants of one noisy step, with T = timescale_factor and dt' = dt/T²."""
        cfg = self.cfg
        T = cfg.timescale_factor
        dt_slow = cfg.dt / T**2
        rate_u = dt_slow / cfg.tau_u
        return {"k_i": self.k_i, "k_p": self.k_p, "sigma": cfg.sigma,
                # ε' = ε + T/τ_ε·(−dt'·ε + √dt'·ξ) = (1 − T·dt'/τ_ε)·ε + (T·√dt'/τ_ε)·ξ
                "eps_keep": 1.0 - T / cfg.tau_eps * dt_slow,
                "noise_scale": T / cfg.tau_eps * math.sqrt(dt_slow),
                "rate_v": cfg.dt / cfg.tau_v, "rate_slow_v": dt_slow / cfg.tau_v,
                "rate_u": rate_u, "keep_ui": 1.0 - rate_u * self.alpha}

    def noisy_step(self, f, onehot, u_ref, rates, xi, v, v_hat, u_i, eps):
        """One step of the noisy phase (docs/equations.md, "lcp-lf"). ξ ~ N(0, I) is drawn by
        the caller (`noise`: outside the function, also when this is compiled).
        Returns the next (v, v̂, uᵢ, ε) and this step's −v_fbᵀ(u − u_ref) summed over the batch
        (A's increment times σ²)."""
        g = loss_gradient(v_hat, onehot)
        u = self.k_i * u_i - self.k_p * g
        v_fb = u @ self.Q.t() + rates["sigma"] * eps
        dA = -(v_fb.t() @ (u - u_ref))
        eps_next = rates["eps_keep"] * eps + rates["noise_scale"] * xi
        return ((v + rates["rate_v"] * (f(v) - v + v_fb),
                 v_hat + rates["rate_slow_v"] * (f.decode(v) - v_hat + u),
                 u_i + rates["rate_u"] * (-g - self.alpha * u_i),
                 eps_next), dA)

    # steps of the compiled noisy phase whose contributions to A are summed by one product
    A_CHUNK = 16

    def noise(self, key: int | None, step: int, like: torch.Tensor) -> torch.Tensor:
        """ξ of noisy step `step`: with `key` (lf_noise=counter) lcp.noise's counter-based
        numbers, else (lf_noise=paper) PyTorch's generator, as the paper's code draws it."""
        if key is None:
            return torch.randn_like(like)
        return counter_normal(key, step, like.shape, like.dtype, like.device)

    def noise_blocks(self, key: int | None, steps: int, like: torch.Tensor):
        """ξ of steps 0 … steps − 1, one per step (`noise`'s numbers): the counter-based ones
        computed A_CHUNK steps at a time (a few kernels per block, not per step)."""
        if key is None:
            for i in range(steps):
                yield self.noise(None, i, like)
            return
        for first in range(0, steps, self.A_CHUNK):
            yield from counter_normal(key, first, like.shape, like.dtype, like.device,
                                      steps=min(self.A_CHUNK, steps - first)).unbind(0)

    @torch.no_grad()
    def noisy_start(self, last: dict) -> tuple:
        """(h, onehot, u_ref, (v, v̂, uᵢ, ε), key) where the noisy phase of the batch `last`
        (the controlled equilibrium `compute_update` kept) starts; ε and the counter noise's
        key (None: lf_noise=paper) drawn from PyTorch's generator, in that order."""
        h, y, u_ref = last["h"], last["y"], last["u"]
        onehot = F.one_hot(y, self.Q.shape[1]).to(h.dtype)
        state = (last["v_tilde"], self.model.decode(last["v_tilde"]) + u_ref, last["u_i"],
                 torch.randn_like(last["v_tilde"]))
        key = draw_key() if self.cfg.lf_noise == "counter" else None
        return h, onehot, u_ref, state, key

    @torch.no_grad()
    def noisy_phase(self, last: dict) -> tuple[torch.Tensor, int]:
        """The noisy dynamics started at the controlled equilibrium (v = ṽ, v̂ = D(ṽ) + u*,
        uᵢ = uᵢ*, u_ref = u*, ε ~ N(0, I)), run for solver_max_iter steps (the noise keeps the
        paper's solver from stopping early); returns the batch mean of the accumulator A
        (N × C) and the number of steps. A is summed over the batch directly instead of keeping
        a B × N × C accumulator: the batch mean is the same. With lf_noise=counter the
        phase's key is drawn from PyTorch's generator after ε's start, so both modes consume
        the generator in the same order up to there."""
        cfg, model, Q = self.cfg, self.model, self.Q
        h, onehot, u_ref, state, key = self.noisy_start(last)
        rates = self.noisy_rates()
        steps = cfg.solver_max_iter
        plan = native.plan_for(model, h, self.kernels, *native.NoisySteps.passes)
        if plan is not None:
            kernel = native.NoisySteps(plan, state, Q, onehot, u_ref, rates,
                                       max(1, min(self.A_CHUNK, steps)), noise_key=key)
            kernel.run(steps)
            A_sum = kernel.finish()
        else:
            f = model.bind(h)
            step = self.maybe_compiled(self.noisy_step)
            A_sum = torch.zeros_like(Q)
            for xi in self.noise_blocks(key, steps, state[3]):
                state, dA = step(f, onehot, u_ref, rates, xi, *state)
                A_sum += dA
        A_mean = A_sum / (cfg.sigma**2 * h.shape[0])
        if not torch.isfinite(A_mean).all():
            raise DivergenceError("lcp-lf: the noisy phase for Q diverged", phase="noisy")
        return A_mean, steps
