#!/usr/bin/env python
"""Does our RBP adjoint diverge on a state where the paper's would not?

On identical weights and one batch of 64 real MNIST digits, with the t1-rnn-rbp row's settings,
the RNN's recurrent weight W is scaled by s so that the spectral radius of J = W diag(tanh'(v̄))
crosses 1. For each s:

  end to end  our `compute_update` (also with LCP_NATIVE=0: the PyTorch definition instead of the
              compiled passes) against the paper's `forward_train` + `backward`, each on its own
              free solve;
  same state  the adjoint solves alone on one free state v* (ours, then the paper's): ours is the
              trainer's solver on `adjoint_map`, the paper's its own backward hook (its
              `forward_train` with the free solve replaced by v*);
  exact       γ = (I − Jᵀ)⁻¹g per sample in float64, what the Picard iteration converges to when
              ρ(J) < 1, and the parameter gradient it gives.

Columns. ρ(J)max, ρ>1: the largest spectral radius over the batch at our state, and how many
samples exceed 1; |Δv*|: the largest difference of the two free states. An adjoint cell is its
iterations (max_iter: not converged), `raise@k` where ours raised DivergenceError at iteration k,
or `nan@k` where the paper's iterate k was its first non-finite one. |grad|: the model gradient's
norm; cos: cosine of two gradients (o ours, e ours with LCP_NATIVE=0, p the paper's, x exact) or
of the two γ; rel: ‖γ_ours − γ_paper‖ / ‖γ_paper‖. clip: what the paper's loop does next,
clip_grad_norm_(metagrad_clip): `kept`, `scaled` (down to metagrad_clip), `zero` (its norm
overflowed: every gradient becomes 0), `nan` (the optimizer step writes NaN into the weights).

Finding. On one state the two adjoint solves agree to float32 rounding at every scale, and where
the iteration overflows ours raises at the very iteration where the paper's turns non-finite:
ours does not diverge where the paper's would not. End to end they agree while the two free
states stay close; past ρ(J) = 1 the free solve stops at max_iter in a state so sensitive that
the compiled passes' rounding moves ours away from the paper's, and then one code overflows at a
scale where the other does not yet, either way round (with LCP_NATIVE=0 ours follows the paper's
step for step). There neither adjoint is the gradient: the iteration grows by orders of magnitude
and points nowhere near (I − Jᵀ)⁻¹g; the paper's loop scales it down, zeroes it when its norm
overflows, or writes NaN into the weights when its iterate does, where ours raises and the
training loop skips the step.

The paper's code is imported from DIR (a checkout of its repository) through step_time.py's
helpers; MNIST is read from DATA as lcp.data does (DATA/MNIST/raw):

    python benchmarks/adjoint_divergence.py --compare-to ~/src/least-control --data-dir DATA
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_time's helpers

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lcp.data import load_split  # noqa: E402
from lcp.errors import DivergenceError  # noqa: E402
from lcp.trainers.backprop import adjoint_map  # noqa: E402
from pipeline.manifest.manifest import load_manifest  # noqa: E402
from step_time import BACKEND_ENV, Ours, Theirs, cosine, under_env  # noqa: E402

ROW = "t1-rnn-rbp"  # the paper's RNN trained by RBP (experiments.yaml)
AGREE = 0.99999  # cosine above which two finite results count as the same
COMPARISONS = ("end to end", "end to end, LCP_NATIVE=0", "adjoint alone, our v*",
               "adjoint alone, the paper's v*")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare-to", metavar="DIR", required=True,
                   help="folder with the paper's code (fixpoint_solver.py, ...)")
    p.add_argument("--data-dir", metavar="DATA", required=True, help="MNIST: DATA/MNIST/raw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain", type=int, default=0, metavar="N",
                   help="train ours N steps (its loop's step: clip, Adam) before scaling W")
    p.add_argument("--scales", default="1,1.5,2,2.5,3,3.5,4,5,6", help="comma-separated s")
    p.add_argument("--batch-index", type=int, default=0, help="which batch of 64 of the train set")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--json", metavar="PATH", default=None, help="write the rows as JSON")
    return p.parse_args(argv)


def gnorm(named) -> float:
    """float64 l2 norm of a named gradient dict (inf if an element is not finite)."""
    if not all(bool(torch.isfinite(t).all()) for t in named.values()):
        return float("inf")
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in named.values()))


def cos(a, b) -> float:
    """Cosine between two gradients (named dicts) or two tensors; nan where one is missing."""
    if a is None or b is None:
        return float("nan")
    return cosine(*(({"": a}, {"": b}) if torch.is_tensor(a) else (a, b)))


def jacobians(W, v):
    """Per sample J = W diag(tanh'(v)) in float64 (B × n × n)."""
    return W.double().unsqueeze(0) * (1 - torch.tanh(v.double()).pow(2)).unsqueeze(1)


def outcome(iters, overflow, grads=None, phase="adjoint") -> dict:
    """A solve's result; overflow "update" where the adjoint stayed finite but the gradient not."""
    out = {"iters": iters, "overflow": overflow, "phase": phase}
    if grads is not None:
        out["grad_norm"] = gnorm(grads)
        if overflow is None and not math.isfinite(out["grad_norm"]):
            out["overflow"] = "update"
    return out


def recording(solver, calls: list):
    """A stand-in for the paper's trainer's `root_finder`: its solver, unchanged, on a map that
    notes in `calls` per solve whether each iterate is finite, and the last iterate."""
    def root_finder(fn, *state):
        calls.append(rec := {"finite": [], "last": None})

        def noted(*args):
            out = fn(*args)
            rec["finite"].append(all(bool(torch.isfinite(t).all()) for t in out))
            rec["last"] = out[0].detach()
            return out
        return solver(noted, *state)
    return root_finder


def paper_rbp(theirs, calls, ours, x, y, v_star=None):
    """The paper's RBP step (raw gradients) on its own free state, or on `v_star` (its free solve
    replaced): outcome, gradients, adjoint γ, free state."""
    calls.clear()
    if v_star is not None:
        theirs.trainer.find_fixpoint = lambda model, encoding: v_star.clone()
    try:
        theirs.optimizer.zero_grad()
        out = theirs.trainer.forward_train(theirs.model, x, y, auxiliary_module=theirs.aux)
        theirs.loss_fn(out, y).backward()
    finally:
        if v_star is not None:
            del theirs.trainer.find_fixpoint
    finite = calls[-1]["finite"]  # the adjoint: the step's last solve
    first_bad = next((k + 1 for k, ok in enumerate(finite) if not ok), None)
    grads = theirs.named_update(ours)
    free = v_star if v_star is not None else calls[0]["last"]
    return outcome(len(finite), first_bad, grads), grads, calls[-1]["last"], free


def ours_rbp(ours, x, y):
    """Our RBP step (`compute_update`): outcome and gradients (None where it raised)."""
    ours.optimizer.zero_grad(set_to_none=True)
    try:
        stats = ours.trainer.compute_update(x, y)
    except DivergenceError as exc:
        return outcome(None, exc.iteration, phase=exc.phase), None
    grads = ours.named_update()
    ours.optimizer.zero_grad(set_to_none=True)
    return outcome(int(stats["adjoint/iterations"]), None, grads), grads


def ours_adjoint(ours, h, v_star, y):
    """Our adjoint solve alone at v̄ = f(h, v*): outcome, γ (None where it raised), v̄, g."""
    v_bar = ours.model.implicit(h, v_star).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ours.model.decode(v_bar), y), v_bar)
    transpose = ours.model.bind(h).transpose_at(v_bar.detach())
    try:
        with torch.no_grad():
            (gamma,), st = ours.trainer.solver(lambda gm: (adjoint_map(transpose, g, gm),),
                                               (g,), phase="adjoint")
    except DivergenceError as exc:
        return outcome(None, exc.iteration), None, v_bar.detach(), g
    return outcome(st.iterations, None), gamma, v_bar.detach(), g


def exact_gradient(ours, x, y, v_star, v_bar, g):
    """The parameter gradient from γ = (I − Jᵀ)⁻¹g (float64), as compute_update builds it."""
    J = jacobians(ours.model.blocks[0].weight.detach(), v_bar)
    eye = torch.eye(J.shape[1], dtype=J.dtype).unsqueeze(0)
    gamma = torch.linalg.solve(eye - J.transpose(1, 2), g.double().unsqueeze(2)).squeeze(2)
    m = ours.model
    m.zero_grad(set_to_none=True)
    h = m.encode(x)
    F.cross_entropy(m.decode(m.implicit(h, v_star).detach()), y).backward()  # the decoder's
    m.implicit(h, v_star).backward(gamma.float())  # f's and E's
    grads = ours.named_update()
    m.zero_grad(set_to_none=True)
    return grads


def verdict(o, p, c) -> str:
    if o["overflow"] is None and p["overflow"] is None:
        return "agree" if c >= AGREE else "other"
    if o["overflow"] is not None and p["overflow"] is not None:
        return "same overflow" if o["overflow"] == p["overflow"] else "other"
    return "one only"


def run_scale(s, ours, theirs, calls, base, x, y):
    with torch.no_grad():
        ours.model.load_state_dict(base)
        ours.model.blocks[0].weight.mul_(s)
        h = ours.model.encode(x)
        v_ours = ours.trainer.free_equilibrium(h)[0].clone()
        J = jacobians(ours.model.blocks[0].weight, ours.model.implicit(h, v_ours))
    theirs.copy_from(ours)
    rho = torch.linalg.eigvals(J).abs().max(dim=1).values
    row = {"s": s, "rho_max": rho.max().item(), "rho_gt1": int((rho > 1).sum())}

    # end to end: ours, ours on the PyTorch definition, the paper's and what its loop clips
    o, g_o = ours_rbp(ours, x, y)
    e, g_e = under_env(BACKEND_ENV["eager"], lambda: ours_rbp(ours, x, y))()
    p, g_p, _, v_paper = paper_rbp(theirs, calls, ours, x, y)
    clip = ours.cfg.metagrad_clip
    total = float(torch.nn.utils.clip_grad_norm_(theirs.model.parameters(), clip))
    clipped = list(theirs.named_update(ours).values())
    row["clip"] = ("nan" if not all(bool(torch.isfinite(t).all()) for t in clipped)
                   else "zero" if all(bool((t == 0).all()) for t in clipped)
                   else "scaled" if total > clip else "kept")
    row.update(dv_star=(v_ours - v_paper).abs().max().item(), ours=o, eager=e, paper=p,
               cos_op=cos(g_o, g_p), cos_ep=cos(g_e, g_p))
    row["verdicts"] = {COMPARISONS[0]: verdict(o, p, row["cos_op"]),
                       COMPARISONS[1]: verdict(e, p, row["cos_ep"])}

    # the adjoint alone, on one free state; the exact gradient at ours
    for name, v_star in zip(COMPARISONS[2:], (v_ours, v_paper)):
        so, gam_o, v_bar, g = ours_adjoint(ours, h, v_star, y)
        sp, _, gam_p, _ = paper_rbp(theirs, calls, ours, x, y, v_star)
        rel = (float((gam_o.double() - gam_p.double()).norm() / gam_p.double().norm())
               if gam_o is not None else float("nan"))
        row[name] = {"ours": so, "paper": sp, "cos": cos(gam_o, gam_p), "rel": rel}
        row["verdicts"][name] = verdict(so, sp, row[name]["cos"])
        if v_star is v_ours:
            g_x = exact_gradient(ours, x, y, v_ours, v_bar, g)
            row.update(grad_norm_exact=gnorm(g_x), cos_ox=cos(g_o, g_x), cos_px=cos(g_p, g_x))
    return row


def cell(out, tag) -> str:
    """An adjoint cell: its iterations, or where it overflowed."""
    k = out["overflow"]
    if k is None:
        return str(out["iters"])
    if k == "update":
        return "grad inf"
    return f"{tag if out['phase'] == 'adjoint' else out['phase']}@{k}"


def num(v, spec=".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(title, rows, cols) -> None:
    """Print `rows` under `title`, one column per (header, width, value of a row)."""
    head = " ".join(f"{h:>{w}}" for h, w, _ in cols)
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for r in rows:
        print(" ".join(f"{f(r):>{w}}" for _, w, f in cols))


def print_tables(rows, max_iter) -> None:
    table(f"end to end (adjoint: iterations, {max_iter} = max_iter, or raise@k / nan@k: "
          "overflow at iteration k)", rows, [
              ("s", 5, lambda r: f"{r['s']:g}"), ("ρ(J)max", 7, lambda r: f"{r['rho_max']:.4f}"),
              ("ρ>1", 4, lambda r: str(r["rho_gt1"])),
              ("|Δv*|", 7, lambda r: num(r["dv_star"], ".2g")),
              ("ours", 9, lambda r: cell(r["ours"], "raise")),
              ("|grad|", 8, lambda r: num(r["ours"].get("grad_norm"))),
              ("eager", 9, lambda r: cell(r["eager"], "raise")),
              ("paper", 8, lambda r: cell(r["paper"], "nan")),
              ("|grad|", 8, lambda r: num(r["paper"]["grad_norm"])),
              ("clip", 6, lambda r: r["clip"]), ("cos o/p", 8, lambda r: num(r["cos_op"], ".5f")),
              ("cos e/p", 8, lambda r: num(r["cos_ep"], ".5f")),
              ("|grad| x", 8, lambda r: num(r["grad_norm_exact"])),
              ("cos o/x", 8, lambda r: num(r["cos_ox"], ".4f")),
              ("cos p/x", 8, lambda r: num(r["cos_px"], ".4f"))])
    cols = [("s", 5, lambda r: f"{r['s']:g}")]
    for k in COMPARISONS[2:]:
        cols += [("|", 1, lambda r: "|"), ("ours", 9, lambda r, k=k: cell(r[k]["ours"], "raise")),
                 ("paper", 8, lambda r, k=k: cell(r[k]["paper"], "nan")),
                 ("cos γ", 10, lambda r, k=k: num(r[k]["cos"], ".7f")),
                 ("rel", 8, lambda r, k=k: num(r[k]["rel"], ".2g"))]
    table("the adjoint alone, both codes on one free state v*: ours | the paper's", rows, cols)


def print_summary(rows) -> None:
    kinds = ("agree", "same overflow", "one only", "other")
    print(f"\nsummary: {len(rows)} scales; agree = both finite, cos ≥ {AGREE}; same overflow = "
          "both overflow at the same iteration;\none only = exactly one raises/overflows; other "
          "= both finite with a lower cos, or both overflow at different iterations")
    print(f"{'comparison':<30}" + "".join(f"{k:>15}" for k in kinds))
    for comp in COMPARISONS:
        counts = [sum(r["verdicts"][comp] == k for r in rows) for k in kinds]
        print(f"{comp:<30}" + "".join(f"{n:>15}" for n in counts))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_manifest(REPO / "experiments.yaml").get(ROW).config(args.seed)
    cfg = cfg.replace(device="cpu")
    print(f"# {ROW} seed {args.seed}: solver {cfg.solver}, max_iter {cfg.solver_max_iter}, "
          f"threshold {cfg.solver_error_threshold} ({cfg.solver_threshold_metric}), "
          f"metagrad_clip {cfg.metagrad_clip}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    ours = Ours(cfg, "cpu", args.seed)
    theirs = Theirs(args.compare_to, cfg, "cpu", ours)  # the paper's initial weights, in ours
    calls: list = []
    theirs.trainer.root_finder = recording(theirs.solver, calls)

    xs, ys = load_split("mnist", args.data_dir, train=True, download=False)
    if args.pretrain:
        perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(args.seed))
        t0 = time.time()
        for i in range(args.pretrain):
            idx = perm[(i * 64) % len(perm):][:64]
            ours.step(xs[idx], ys[idx])
        print(f"# pretrained ours {args.pretrain} steps in {time.time() - t0:.0f} s")
    b = args.batch_index
    x, y = xs[b * 64:(b + 1) * 64], ys[b * 64:(b + 1) * 64]
    base = {k: v.detach().clone() for k, v in ours.model.state_dict().items()}
    W0 = base["blocks.0.weight"].double()
    print(f"# unscaled W: ρ(W) {torch.linalg.eigvals(W0).abs().max().item():.4f}, "
          f"‖W‖₂ {torch.linalg.matrix_norm(W0, 2).item():.4f}")

    rows = []
    for s in [float(v) for v in args.scales.split(",") if v.strip()]:
        rows.append(run_scale(s, ours, theirs, calls, base, x, y))
    print_tables(rows, cfg.solver_max_iter)
    print_summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
