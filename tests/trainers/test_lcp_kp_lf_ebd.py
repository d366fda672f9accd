"""lcp-kp, lcp-lf and lcp-ebd against lcp-di, BP and their own rules."""

import math

import pytest
import torch
import torch.nn.functional as F

from lcp.config import RunConfig
from lcp.models import build_model
from lcp.trainers import build_trainer
from lcp.trainers.base import loss_gradient
from lcp.training import build_optimizer


def setup(model="ff", trainer="lcp-di", hidden=32, batch=16, seed=0, **kw):
    torch.manual_seed(seed)
    settings = dict(alpha=0.1, solver_max_iter=800, solver_error_threshold=1e-8)
    settings.update(kw)
    cfg = RunConfig(model=model, trainer=trainer, rnn_hidden_units=hidden, **settings)
    net = build_model(cfg, (1, 28, 28), 10)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    return cfg, net, x, y


def update(cfg, net, x, y, trainer=None):
    net.zero_grad()
    trainer = trainer or build_trainer(cfg, net)
    trainer.compute_update(x, y)
    return torch.cat([p.grad.flatten() for p in net.parameters()]), trainer


def learnable_problem(n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    for c in range(10):
        x[y == c, 0, 2 * c:2 * c + 3, 5:8] += 2.0
    return x, y


def train(cfg, net, trainer, x, y, steps):
    opt = build_optimizer(cfg, list(net.parameters()) + trainer.parameters())
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,))
        trainer.pre_update()
        opt.zero_grad()
        trainer.compute_update(x[i], y[i])
        trainer.post_update()
        opt.step()


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def controlled_steps_by_hand(trainer, net, x, y, steps, feedback):
    """`steps` explicit-Euler steps of the controlled dynamics from the zero state, written out
    from the equations, for a model of one dense block (ff, rnn). `feedback` says how e' is
    formed: "kp" (the learned maps B and D_t), "lf" (e' = Q·u, which v' then reads) or
    "transpose" (lcp-di's exact transposes Wᵀ and W_Dᵀ)."""
    cfg = trainer.cfg
    dt_v, dt_u, dt_e = cfg.dt / cfg.tau_v, cfg.dt / cfg.tau_u, cfg.dt / cfg.tau_e
    spec, r = net.block_specs[0], net.readout_start
    if feedback == "kp":
        back_block = trainer.auxiliary.maps[0].weight.t()  # e_out ↦ e_out Mᵀ, M: out → in
        back_readout = trainer.auxiliary.D_t.t()  # u ↦ D_t·u
    else:
        back_block, back_readout = net.blocks[0].weight, net.readout.weight
    with torch.no_grad():
        h = net.encode(x)
        onehot = F.one_hot(y, 10).to(h.dtype)
        v = h.new_zeros(x.shape[0], net.state_size)
        e = torch.zeros_like(v)
        v_hat = h.new_zeros(x.shape[0], 10)
        u_i = torch.zeros_like(v_hat)
        for _ in range(steps):
            g = loss_gradient(v_hat, onehot)
            u = cfg.k_i * u_i - cfg.k_p * g
            if feedback == "lf":
                e_next = u @ trainer.Q.t()
                v_next = v + dt_v * (net.implicit(h, v) - v + e_next)
            else:
                back = torch.zeros_like(e)
                back[:, spec.in_start:spec.in_end] += (
                    e[:, spec.out_start:spec.out_end] @ back_block)
                back[:, r:] += u @ back_readout
                e_next = e + dt_e * (-e + net.act_grad(v) * back)
                v_next = v + dt_v * (net.implicit(h, v) - v + e)
            v_hat_next = v_hat + dt_v * (net.decode(v) - v_hat + u)
            u_i_next = u_i + dt_u * (-g - cfg.alpha * u_i)
            v, v_hat, u_i, e = v_next, v_hat_next, u_i_next, e_next
    return {"v": v, "v_hat": v_hat, "u_i": u_i, "e": e}


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("model", ["ff", "rnn"])
@pytest.mark.parametrize("trainer", ["lcp-kp", "lcp-lf"])
def test_kp_and_lf_controllers_act_through_their_own_feedback(trainer, model, compiled,
                                                              monkeypatch):
    """Five controlled steps with random feedback (B and D_t, or Q) against the same steps by
    hand; the exact transposes Wᵀ in their place give another state, so a controller that
    silently used them fails here. Measured: own feedback ≤ 3e-16 relative on every tensor
    (0 with the PyTorch definition); the Wᵀ variant's e differs by 1.1 (kp) and 4.4–5.7 (lf).
    `compiled`: the compiled backend (lcp/native) or the PyTorch definition (LCP_NATIVE=0)."""
    monkeypatch.setenv("LCP_NATIVE", "1" if compiled else "0")
    cfg, net, x, y = setup(model, trainer, solver_max_iter=5, k_p=0.3, dt=0.5, kp_wd=0.0)
    tr = build_trainer(cfg, net)
    update(cfg, net, x, y, trainer=tr)
    assert tr.last is not None
    own = controlled_steps_by_hand(tr, net, x, y, 5, "kp" if trainer == "lcp-kp" else "lf")
    transposes = controlled_steps_by_hand(tr, net, x, y, 5, "transpose")
    for key in ("v", "v_hat", "u_i", "e"):
        assert relative_difference(tr.last[key], own[key]) < 1e-12, key
    assert relative_difference(tr.last["e"], transposes["e"]) > 0.5
    assert relative_difference(tr.last["v"], transposes["v"]) > 1e-3


# ------------------------------------------------------------------ lcp-kp
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_kp_with_exact_transposes_gives_the_lcp_di_update(model, compiled, monkeypatch):
    """Measured: identical to the last bit with the compiled backend, ~1e-16 relative with the
    PyTorch definition (LCP_NATIVE=0)."""
    monkeypatch.setenv("LCP_NATIVE", "1" if compiled else "0")
    cfg, net, x, y = setup(model, kp_wd=0.0)
    di = build_trainer(cfg, net)
    kp = build_trainer(cfg.replace(trainer="lcp-kp"), net)
    g_di, _ = update(cfg, net, x, y, trainer=di)
    with torch.no_grad():
        kp.auxiliary.maps[0].weight.copy_(net.blocks[0].weight.t())
        kp.auxiliary.D_t.copy_(net.readout.weight.t())
    g_kp, _ = update(cfg, net, x, y, trainer=kp)
    assert relative_difference(g_kp, g_di) < 1e-12
    assert g_kp.norm().item() == pytest.approx(g_di.norm().item(), rel=1e-12)
    for key in ("v", "v_hat", "u_i", "e", "u"):
        assert relative_difference(kp.last[key], di.last[key]) < 1e-12, key


def test_kp_feedback_update_is_the_transpose_of_the_forward_update():
    cfg, net, x, y = setup("ff", "lcp-kp", kp_wd=0.0)
    kp = build_trainer(cfg, net)
    with torch.no_grad():
        kp.auxiliary.maps[0].weight.copy_(net.blocks[0].weight.t())
        kp.auxiliary.D_t.copy_(net.readout.weight.t())
    update(cfg, net, x, y, trainer=kp)
    # readout: −u* φ(ṽ)ᵀ vs D_t: −φ(ṽ) u*ᵀ — exact transposes
    assert torch.allclose(kp.auxiliary.D_t.grad, net.readout.weight.grad.t(), atol=1e-6)
    # the feedback block gets −φ(ṽ_in) e*_outᵀ; the forward block −e*_out φ(v*_in)ᵀ: nearly so
    cos = F.cosine_similarity(kp.auxiliary.maps[0].weight.grad.flatten(),
                              net.blocks[0].weight.grad.t().flatten(), dim=0)
    assert cos.item() > 0.99


def test_kp_feedback_starts_normalised_and_decay_is_an_explicit_step():
    cfg, net, x, y = setup("ff", "lcp-kp", kp_wd=0.01)
    kp = build_trainer(cfg, net)
    assert kp.auxiliary.maps[0].weight.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert kp.auxiliary.D_t.std().item() == pytest.approx(1 / math.sqrt(10 * 32), rel=0.2)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    fb_before = kp.auxiliary.maps[0].weight.detach().clone()
    kp.pre_update()
    assert torch.allclose(kp.auxiliary.maps[0].weight, fb_before * 0.99)
    assert torch.allclose(net.blocks[0].weight, before["blocks.0.weight"] * 0.99)
    assert torch.allclose(net.readout.bias, before["readout.bias"] * 0.99)
    assert torch.equal(net.encoder[1].weight, before["encoder.1.weight"])  # not the encoder
    # compute_update alone changes no parameter
    snapshot = [p.detach().clone() for p in net.parameters()]
    kp.compute_update(x, y)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, net.parameters()))


def kp_alignment(kp, net):
    fb = torch.cat([kp.auxiliary.maps[0].weight.flatten(), kp.auxiliary.D_t.flatten()])
    fw = torch.cat([net.blocks[0].weight.t().flatten(), net.readout.weight.t().flatten()])
    return F.cosine_similarity(fb, fw, dim=0).item()


def test_kp_training_aligns_feedback_with_the_forward_transposes():
    # measured: 0.06 at the start, 0.87 after 300 steps (ff, 32 units, seed 0)
    x, y = learnable_problem()
    cfg, net, _, _ = setup("ff", "lcp-kp", solver_max_iter=200, solver_error_threshold=1e-6)
    kp = build_trainer(cfg, net)
    start = kp_alignment(kp, net)
    train(cfg, net, kp, x, y, steps=300)
    assert start < 0.2
    assert kp_alignment(kp, net) > 0.7


def test_kp_checkpoint_holds_the_feedback_weights():
    cfg, net, x, y = setup("ff", "lcp-kp")
    kp = build_trainer(cfg, net)
    state = kp.state_dict()
    assert {"maps.0.weight", "D_t"} <= set(state)
    other = build_trainer(cfg, build_model(cfg, (1, 28, 28), 10))
    other.load_state_dict(state)
    assert torch.equal(other.auxiliary.D_t, kp.auxiliary.D_t)


# ------------------------------------------------------------------ lcp-ebd
@pytest.mark.parametrize("model,ff_init", [("ff", False), ("rnn", True)])
def test_ebd_reaches_the_lcp_di_equilibrium(model, ff_init):
    """The energy minimum after 800 Adam steps is lcp-di's controlled equilibrium. Measured
    (ff | rnn): v 2.2e-4 | 4.7e-4, v̂ 4.9e-6 | 3.3e-5, e 1.7e-3 | 4.6e-3, u 5.8e-5 | 6.4e-4
    relative; update cosine 0.999995 | 0.99999, norm ratio 1.0001 | 1.0009."""
    cfg, net, x, y = setup(model, k_i=1.0, k_p=0.0)
    g_di, di = update(cfg, net, x, y)
    ebd_cfg = cfg.replace(trainer="lcp-ebd", ebd_lr=0.01, ff_init=ff_init, solver_max_iter=800)
    g_ebd, ebd = update(ebd_cfg, net, x, y)
    with torch.no_grad():
        h = net.encode(x)
        v, v_hat, _ = ebd.energy_minimum(h, y)
        e, u = v - net.implicit(h, v), v_hat - net.decode(v)
    assert relative_difference(v, di.last["v"]) < 2e-3
    assert relative_difference(v_hat, di.last["v_hat"]) < 3e-4
    assert relative_difference(e, di.last["e"]) < 2e-2
    assert relative_difference(u, di.last["u"]) < 5e-3
    assert F.cosine_similarity(g_ebd, g_di, dim=0).item() >= 0.9999
    assert g_ebd.norm().item() == pytest.approx(g_di.norm().item(), rel=5e-3)


def test_ebd_plain_gradient_descent_also_runs_exactly_max_iter_steps():
    cfg, net, x, y = setup("ff", "lcp-ebd", ebd_optim="gd", ebd_lr=0.1, solver_max_iter=37)
    stats = build_trainer(cfg, net).compute_update(x, y)
    assert stats["energy/iterations"] == 37 and math.isfinite(stats["energy/value"])


# ------------------------------------------------------------------ lcp-lf
def test_lf_noisy_phase_is_reproducible_under_a_seed():
    cfg, net, x, y = setup("ff", "lcp-lf", solver_max_iter=50, sigma=0.01)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        lf = build_trainer(cfg, net)
        lf.compute_update(x, y)
        lf.post_update()
        results.append(lf.Q.clone())
    assert torch.equal(results[0], results[1])
    torch.manual_seed(1)
    lf = build_trainer(cfg, net)
    lf.compute_update(x, y)
    lf.post_update()
    assert not torch.equal(lf.Q, results[0])


@pytest.mark.parametrize("lf_noise", ["paper", "counter"])
def test_lf_q_moves_by_its_rule(lf_noise):
    """Two noisy steps computed by hand from docs/equations.md ("lcp-lf"), with the per-sample
    B × N × C accumulator; the noise replayed from PyTorch's generator (paper) or computed from
    the phase's key (counter: lcp.noise, the key drawn after ε's start)."""
    from lcp.noise import counter_normal, draw_key

    cfg, net, x, y = setup("ff", "lcp-lf", solver_max_iter=2, sigma=0.05, k_p=0.3,
                           timescale_factor=5.0, tau_Q=10.0, wd_Q=0.01, lf_noise=lf_noise)
    lf = build_trainer(cfg, net)
    lf.compute_update(x, y)
    last = lf.last
    Q0 = lf.Q.clone()
    state = torch.get_rng_state()
    lf.post_update()
    torch.set_rng_state(state)  # replay the same noise by hand
    T, dt, sigma = 5.0, 1.0, 0.05
    dt2 = dt / T**2
    onehot = F.one_hot(y, 10).double() if x.dtype == torch.float64 else F.one_hot(y, 10).float()
    v, u_ref, u_i = last["v_tilde"], last["u"], last["u_i"]
    v_hat = net.decode(v).detach() + u_ref
    eps = torch.randn_like(v)
    key = draw_key() if lf_noise == "counter" else None
    A = torch.zeros(x.shape[0], *Q0.shape)
    with torch.no_grad():
        for step in range(2):
            g = loss_gradient(v_hat, onehot)
            u = cfg.k_i * u_i - cfg.k_p * g
            xi = (torch.randn_like(eps) if key is None
                  else counter_normal(key, step, eps.shape, eps.dtype))
            eps_next = eps + T * (-dt2 * eps + math.sqrt(dt2) * xi)
            v_fb = u @ Q0.t() + sigma * eps
            v_next = v + dt * (net.implicit(last["h"], v) - v + v_fb)
            v_hat_next = v_hat + dt2 * (net.decode(v) - v_hat + u)
            u_i = u_i + dt2 * (-g - cfg.alpha * u_i)
            A = A - (1 / sigma**2) * v_fb.unsqueeze(-1) @ (u - u_ref).unsqueeze(-2)
            v, v_hat, eps = v_next, v_hat_next, eps_next
    expected = Q0 + dt / 10.0 * (A.mean(0) - 0.01 * Q0)
    assert not torch.allclose(expected, Q0)
    assert torch.allclose(lf.Q, expected, rtol=1e-4, atol=1e-7)


def test_lf_q_is_a_buffer_not_trained_by_the_optimizer():
    cfg, net, x, y = setup("ff", "lcp-lf")
    lf = build_trainer(cfg, net)
    assert lf.parameters() == [] and "Q" in lf.state_dict()
    assert lf.Q.std().item() == pytest.approx(1 / math.sqrt(10), rel=0.1)


def test_lf_training_aligns_the_update_with_backprop():
    # measured: cosine to the BP gradient −0.12 at the start, 0.61 after 300 steps
    x, y = learnable_problem()
    cfg, net, _, _ = setup("ff", "lcp-lf", solver_max_iter=200, solver_error_threshold=1e-6,
                           sigma=0.01, wd_Q=0.01, tau_Q=100.0)
    lf = build_trainer(cfg, net)
    g_lf, _ = update(cfg, net, x[:64], y[:64], trainer=lf)
    g_bp, _ = update(cfg.replace(trainer="bp"), net, x[:64], y[:64])
    assert F.cosine_similarity(g_lf, g_bp, dim=0).item() < 0.1  # random Q: not aligned yet
    train(cfg, net, lf, x, y, steps=300)
    g_lf, _ = update(cfg, net, x[:64], y[:64], trainer=lf)
    g_bp, _ = update(cfg.replace(trainer="bp"), net, x[:64], y[:64])
    assert F.cosine_similarity(g_lf, g_bp, dim=0).item() > 0.4
