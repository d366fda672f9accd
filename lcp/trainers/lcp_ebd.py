"""lcp-ebd: least control found by minimising an energy (SPEC §3, lcp-ebd).

Leaf states v (N) and v̂ (C) start at zero — or, with `ff_init`, at the free equilibrium and
D(v*) — and Adam (`ebd_optim=adam`) or plain gradient descent (`gd`) at `ebd_lr` minimises, for
exactly `solver_max_iter` steps and with h held fixed,

    E(v, v̂) = ½·Σ‖v − f(h, v)‖² + ½·Σ‖v̂ − D(v)‖² + (1/α)·L(v̂, y).

Its gradient is taken in closed form (∂E/∂v = r_f − Jᵀr_f − (∂D/∂v)ᵀr_D, ∂E/∂v̂ = r_D + ∇L/α
with r_f = v − f(h, v), r_D = v̂ − D(v)), so no graph is built per step. Then e* = v* − f(h, v*),
u* = v̂* − D(v*), and the update is the lcp-di rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lcp.errors import DivergenceError
from lcp.models import LinearReadoutModel, run_products
from lcp.trainers.base import Trainer, loss_gradient


class EnergyBasedTrainer(Trainer):
    name = "lcp-ebd"

    def energy_minimum(self, h, y):
        cfg, model = self.cfg, self.model
        h = h.detach()
        num_classes = model.readout.out_features
        onehot = F.one_hot(y, num_classes).to(h.dtype)
        stats = {}
        with torch.no_grad():
            if cfg.ff_init:
                v0, free = self.free_equilibrium(h)
                stats.update(self.solver_stats("free", free))
                v_hat0 = model.decode(v0)
            else:
                v0 = model.zero_state(h)
                v_hat0 = h.new_zeros(h.shape[0], num_classes)
        inv_alpha = 1.0 / cfg.alpha
        if self.fused and isinstance(model, LinearReadoutModel):
            v, v_hat = self._fused_descent(h, onehot, v0, v_hat0)
            with torch.no_grad():
                r_f = v - model.implicit(h, v)
                r_d = v_hat - model.decode(v)
                energy = (0.5 * r_f.pow(2).sum() + 0.5 * r_d.pow(2).sum()
                          + inv_alpha * F.cross_entropy(v_hat, y)).item()
            return self._finish(v, v_hat, energy, stats)
        v = v0.clone().requires_grad_(True)
        v_hat = v_hat0.clone().requires_grad_(True)
        if cfg.ebd_optim == "adam":
            opt = torch.optim.Adam([v, v_hat], lr=cfg.ebd_lr)
        else:
            opt = torch.optim.SGD([v, v_hat], lr=cfg.ebd_lr)
        with torch.no_grad():
            for _ in range(cfg.solver_max_iter):
                r_f = v - model.implicit(h, v)
                r_d = v_hat - model.decode(v)
                v.grad = r_f - model.implicit_transpose(h, v, r_f) - model.decode_transpose(v, r_d)
                v_hat.grad = r_d + inv_alpha * loss_gradient(v_hat, onehot)
                opt.step()
            r_f = v - model.implicit(h, v)
            r_d = v_hat - model.decode(v)
            energy = (0.5 * r_f.pow(2).sum() + 0.5 * r_d.pow(2).sum()
                      + inv_alpha * F.cross_entropy(v_hat, y)).item()
        return self._finish(v.detach(), v_hat.detach(), energy, stats)

    def _finish(self, v, v_hat, energy, stats):
        if energy != energy or energy == float("inf"):
            raise DivergenceError("lcp-ebd: the energy minimisation diverged; lower ebd_lr",
                                  phase="energy")
        stats.update({"energy/iterations": float(self.cfg.solver_max_iter),
                      "energy/value": energy})
        return v, v_hat, stats

    @torch.no_grad()
    def _fused_descent(self, h, onehot, v0, v_hat0):
        """The descent of `energy_minimum` with the fused kernels of `DynamicsPlan` on one flat
        leaf [v | v̂]: the same closed-form gradient, written in place, and one fused Adam
        kernel (PyTorch's own, `torch._fused_adam_`) instead of the optimizer's per-tensor
        ops. Adam's arithmetic is the same up to rounding."""
        cfg = self.cfg
        plan = self.batch_plan(h)
        bsz, n = h.shape
        x = torch.cat([v0, v_hat0], dim=1)
        grad = torch.empty_like(x)
        v, v_hat = x[:, :n], x[:, n:]
        g_v, g_vh = grad[:, :n], grad[:, n:]
        r_f = torch.empty_like(v0)
        r_d = torch.empty_like(v_hat0)
        r_f_out = plan.out_views(r_f)
        t_r = plan.t[:, plan.r0:]
        inv_alpha_b = 1.0 / (cfg.alpha * bsz)
        target_term = onehot * inv_alpha_b
        lib = plan.native_kernels()
        if lib is not None:
            self._native_descent(lib, plan, x, onehot, inv_alpha_b)
            return x[:, :n].contiguous(), x[:, n:].contiguous()
        step = _descent_step(x, cfg.ebd_optim, cfg.ebd_lr)
        for _ in range(cfg.solver_max_iter):
            # r_f = v − f(h, v),  r_d = v̂ − D(v)
            plan.act(v)
            plan.blocks_add_(torch.sub(v, plan.h_b, out=r_f), alpha=-1.0, views=r_f_out)
            torch.sub(v_hat, plan.b_D, out=r_d).addmm_(t_r, plan.W_D_t, alpha=-1.0)
            # ∂E/∂v = r_f − (Jᵀr_f + (∂D/∂v)ᵀr_d);  ∂E/∂v̂ = r_d + ∇L(v̂)/α
            plan.transpose_into(g_v, v, r_f, r_d, views=r_f_out)
            torch.sub(r_f, g_v, out=g_v)
            torch.add(r_d, plan.softmax(v_hat), alpha=inv_alpha_b, out=g_vh)
            g_vh.sub_(target_term)
            step(grad)
        return x[:, :n].contiguous(), x[:, n:].contiguous()

    def _native_descent(self, lib, plan, x, onehot, inv_alpha_b):
        """`_fused_descent`'s loop with the compiled passes of `lcp.native`: per step tanh and
        the blocks' products by PyTorch; the residuals, the gradient and the Adam (or gradient
        descent) step in two compiled passes. Adam's arithmetic is torch.optim.Adam's (betas
        0.9, 0.999, eps 1e-8), to rounding."""
        from lcp import native

        cfg = self.cfg
        bsz, n = plan.batch, plan.size
        c = x.shape[1] - n
        residuals, descend = lib.get("ebd_residuals", x.dtype), lib.get("ebd_descend", x.dtype)
        p_v, forward_products = plan.forward_products()
        r_f = torch.empty(bsz, n, dtype=x.dtype, device=x.device)
        r_d = torch.empty(bsz, c, dtype=x.dtype, device=x.device)
        # the blocks' transposed products of r_f into their input columns (scratch of the plan)
        p_e, _, writes = plan._scratch_for(False)
        back = [(piece, weight, target, first) for piece, (_, weight, _, _), (target, first)
                in zip(plan.out_views(r_f), plan.blocks, writes)]
        keep = (plan.h_b.contiguous(), plan.W_D.contiguous(), plan.b_D.contiguous(),
                onehot.contiguous())
        h_b, w_d, b_d, onehot_c = keep
        exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
        threads = native.threads_for(bsz, n)
        adam = cfg.ebd_optim == "adam"
        res_args = (bsz, n, c, x.data_ptr(), plan.t.data_ptr(), p_v.data_ptr(), h_b.data_ptr(),
                    w_d.data_ptr(), plan.r0, b_d.data_ptr(), r_f.data_ptr(), r_d.data_ptr(),
                    threads)
        head = (bsz, n, c, x.data_ptr(), plan.t.data_ptr(), r_f.data_ptr(), r_d.data_ptr(),
                p_e.data_ptr() if back else None, w_d.data_ptr(), plan.r0,
                onehot_c.data_ptr(), inv_alpha_b, exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                int(adam), float(cfg.ebd_lr), 0.9, 0.999, 1e-8)
        v = x[:, :n]
        for step in range(1, cfg.solver_max_iter + 1):
            torch.tanh(v, out=plan.t)
            run_products(forward_products)
            residuals(*res_args)
            run_products(back)
            descend(*head, 1.0 - 0.9 ** step, 1.0 - 0.999 ** step, threads)

    def compute_update(self, x, y):
        model = self.model
        h = model.encode(x)
        with self.plan_scope():
            v, v_hat, stats = self.energy_minimum(h, y)
            with torch.no_grad():
                e = v - model.implicit(h, v)  # so that ṽ = f(h, v*) + e* = v*
                u = v_hat - model.decode(v)
            _, update_stats = self.least_control_update(h, v, e, u, y, lambda v_tilde, e: -e)
        stats.update(update_stats)
        return stats


def _descent_step(x: torch.Tensor, kind: str, lr: float):
    """x ← one optimizer step with gradient `grad`: plain gradient descent ('gd') or Adam
    (torch.optim.Adam's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay)."""
    if kind != "adam":
        return lambda grad: x.add_(grad, alpha=-lr)
    exp_avg = torch.zeros_like(x)
    exp_avg_sq = torch.zeros_like(x)
    count = torch.zeros((), dtype=torch.float32, device=x.device)
    fused = getattr(torch, "_fused_adam_", None)
    n = [0]

    def exact(grad):  # torch.optim.Adam's single-tensor arithmetic, op for op
        n[0] += 1
        exp_avg.lerp_(grad, 0.1)
        exp_avg_sq.mul_(0.999).addcmul_(grad, grad, value=0.001)
        bias_correction1 = 1 - 0.9 ** n[0]
        bias_correction2 = 1 - 0.999 ** n[0]
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(1e-8)
        x.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    def fast(grad):
        count.add_(1)
        fused([x], [grad], [exp_avg], [exp_avg_sq], [], [count], lr=lr, beta1=0.9,
              beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)

    if fused is None:
        return exact

    def first(grad):  # the private kernel may be missing or refuse: fall back once
        nonlocal call
        try:
            fast(grad)
            call = fast
        except (RuntimeError, TypeError, NotImplementedError):
            exp_avg.zero_(), exp_avg_sq.zero_(), count.zero_()
            call = exact
            call(grad)

    call = first
    return lambda grad: call(grad)
