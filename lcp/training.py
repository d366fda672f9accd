"""The training loop, readable top to bottom: `fit(cfg, callbacks)` (docs/equations.md,
"Training loop").

Every `eval_epochs` epochs the test (and validation) set is evaluated, as in the paper's script
(which moves every later shuffle: see `RunConfig.watch_epochs`); every `watch_epochs` epochs it
is evaluated without touching the run (`lcp.preserve`); at the end the train and test sets, as the
paper's script prints them (`eval_train/*`, `eval_test/*`). LCP runs measure
their update's alignment with the exact gradient at the end of each epoch (and every
`align_every` steps) without touching the trajectory (`lcp.alignment`).

With `checkpoint_path`, the complete state (model, trainer, optimizer, scheduler, RNG, history)
is written atomically at the end of every epoch, and a later `fit` with the same path resumes
from it instead of starting over.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from lcp.alignment import AlignmentProbe
from lcp.callbacks import CallbackList, FitResult, FitState
from lcp.config import RunConfig
from lcp.data import build_loaders
from lcp.errors import DivergenceError, LcpError, first_line
from lcp.models import build_model
from lcp.preserve import preserved
from lcp.trainers import build_trainer


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise LcpError(f"--device={cfg.device} was asked for but CUDA is not available; "
                       "use --device=cpu or --device=auto")
    return torch.device(cfg.device)


def seed_everything(seed: int) -> None:
    """The paper's seeding (torch, numpy, CUDA, deterministic cuDNN), plus Python's random."""
    if seed < 0:
        return
    # deterministic cuBLAS needs this before CUDA starts (a runner also sets it per process)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True


def build_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.meta_optimizer == "adam":
        return torch.optim.Adam(params, cfg.meta_lr, weight_decay=cfg.meta_wd)
    return torch.optim.SGD(params, cfg.meta_lr, weight_decay=cfg.meta_wd)


def build_scheduler(cfg: RunConfig, optimizer, steps_per_epoch: int):
    if cfg.meta_scheduler != "cos":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, cfg.num_epochs * steps_per_epoch, eta_min=cfg.meta_lr * cfg.gamma)


@torch.no_grad()
def evaluate(trainer, loader, device) -> dict[str, float]:
    """Loss and accuracy at the free equilibrium, averaged over batches as the paper's script
    does (a last partial batch weighs as much as a full one)."""
    losses, accs = [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = trainer.predict(x)
        losses.append(torch.nn.functional.cross_entropy(logits, y).item())
        accs.append((logits.argmax(1) == y).float().mean().item())
    if not losses:
        raise LcpError("evaluation got no batch: the dataset or --limit_eval_batches is empty")
    return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(accs))}


def evaluate_splits(trainer, loaders, splits, device) -> dict[str, float]:
    """`evaluate` on each of `splits` that `loaders` has, as `eval_<split>/<metric>`."""
    return {f"eval_{split}/{k}": v for split in splits if split in loaders
            for k, v in evaluate(trainer, loaders[split], device).items()}


def update_norm(params) -> float:
    """The l2 norm of the update (the `.grad` of `params`), summed in float64: in float32 the
    sum of squares overflows from a norm of about 1.8e19, while every element is still finite."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
             for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def update_is_finite(params) -> bool:
    """Whether every element of the update is finite (the run has diverged otherwise)."""
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class EpochStats:
    """Aggregates the trainer's per-step stats into one record per epoch."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.values[k].append(v)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, vals in self.values.items():
            arr = np.asarray(vals, dtype=float)
            if key.endswith(("/iterations", "/residual")):
                out[f"{key}_mean"] = float(arr.mean())
                out[f"{key}_max"] = float(arr.max())
            elif key.endswith("/hit_max_iter"):
                out[f"{key}_count"] = float(arr.sum())
            else:
                out[f"train/{key}"] = float(arr.mean())
        return out


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | os.PathLike, state: FitState) -> None:
    """Everything needed to resume, written atomically (a crash never leaves half a file)."""
    payload = {
        "format": "lcp-checkpoint-1",
        "config": state.cfg.to_dict(),
        "model": state.model.state_dict(),
        "trainer": state.trainer.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "history": state.history,
        "skipped": state.skipped,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": _numpy_rng_state(),
            "python": random.getstate(),
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _numpy_rng_state() -> tuple:
    """numpy's global RNG state as plain data (a list, not an array): loadable weights-only."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return (str(name), [int(k) for k in key], int(pos), int(has_gauss), float(gauss))


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs: RNG states in checkpoints of earlier versions."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_trusted_payload(path: str | os.PathLike, map_location, what: str):
    """`torch.load` with `weights_only=True`: tensors and plain data only, so that loading a
    file never runs code from it. numpy arrays are allowed explicitly; a file that needs any
    other global is refused with one line."""
    import pickle

    safe_globals = getattr(torch.serialization, "safe_globals", None)  # PyTorch ≥ 2.5
    allowed = safe_globals(_numpy_array_globals()) if safe_globals else contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(exc))
        needs = f" (it asks for {found.group(1)})" if found else ""
        raise LcpError(f"refusing to load {what} {path}: it holds more than tensors and plain "
                       f"data{needs}, and loading it could run code from the file; load only "
                       "files written by lcp") from None
    except Exception as exc:  # a truncated or foreign file
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LcpError(f"cannot read {what} {path}: {text}") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        payload = load_trusted_payload(path, "cpu", "checkpoint")
    except LcpError as exc:
        raise LcpError(f"{exc}. Delete it to start over.") from None
    if not isinstance(payload, dict) or payload.get("format") != "lcp-checkpoint-1":
        raise LcpError(f"{path} is not an lcp checkpoint")
    return payload


def _restore(state: FitState, payload: dict) -> None:
    state.model.load_state_dict(payload["model"])
    state.trainer.load_state_dict(payload["trainer"])
    state.optimizer.load_state_dict(payload["optimizer"])
    if state.scheduler is not None and payload["scheduler"] is not None:
        state.scheduler.load_state_dict(payload["scheduler"])
    state.epoch = payload["epoch"]
    state.global_step = payload["global_step"]
    state.history = list(payload["history"])
    state.skipped = list(payload.get("skipped", []))  # absent from earlier checkpoints
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, key, *rest = rng["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    random.setstate(rng["python"])


# ------------------------------------------------------------------ the loop
def fit(cfg: RunConfig, callbacks=(), *, checkpoint_path: str | os.PathLike | None = None,
        loaders=None) -> FitResult:
    """Train `cfg` to the end (or until a callback asks to stop) and return the final metrics.

    `loaders` = (train_loader, eval_loaders, input_shape, num_classes) replaces the data that
    `cfg.data` names (for custom datasets).
    """
    cbs = CallbackList(callbacks)
    seed_everything(cfg.seed)
    device = resolve_device(cfg)
    train_loader, eval_loaders, input_shape, num_classes = loaders or build_loaders(cfg)
    model = build_model(cfg, input_shape, num_classes).to(device)
    trainer = build_trainer(cfg, model).to(device)
    model_params = list(model.parameters())
    trainer_params = trainer.parameters()
    optimizer = build_optimizer(cfg, model_params + trainer_params)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))
    state = FitState(cfg, model, trainer, optimizer, scheduler, steps_per_epoch=len(train_loader))
    probe = AlignmentProbe.for_run(cfg, model, trainer, train_loader, device)

    if checkpoint_path is not None and Path(checkpoint_path).exists():
        _restore(state, load_checkpoint(checkpoint_path))

    try:
        cbs.on_fit_start(state)
        while state.epoch < cfg.num_epochs and state.stop_reason is None:
            record = train_one_epoch(state, train_loader, device, cbs, model_params,
                                     trainer_params, probe)
            if probe is not None:
                record.update(probe.measure())
            epoch = state.epoch + 1
            evaluation = cfg.evaluation_after(epoch)
            if evaluation == "paper":  # the paper's: it moves every later shuffle
                record.update(evaluate_splits(trainer, eval_loaders, ("test", "val"), device))
            elif evaluation == "watch":
                with preserved(model, trainer):
                    record.update(evaluate_splits(trainer, eval_loaders, ("test", "val"), device))
            record["epoch"] = epoch
            state.epoch = epoch
            state.history.append(record)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, state)
            cbs.on_epoch_end(state, record)

        final = {} if state.stop_reason is not None else evaluate_splits(
            trainer, eval_loaders, ("train", "test", "val"), device)
        result = FitResult(final, state.history, state.stop_reason, state.epoch)
        cbs.on_fit_end(state, result)
        return result
    except BaseException as exc:
        cbs.on_exception(state, exc)
        raise


def train_one_epoch(state: FitState, loader, device, cbs, model_params, trainer_params,
                    probe: AlignmentProbe | None = None):
    cfg, trainer, optimizer, scheduler = state.cfg, state.trainer, state.optimizer, state.scheduler
    stats = EpochStats()
    start = time.perf_counter()
    steps = 0
    allowance = cfg.skip_allowance(state.steps_per_epoch)
    # what a step changes besides .grad and the optimizer: put back when it is skipped
    guarded = list(state.model.buffers()) + trainer.rule_updated_tensors() if allowance else []
    skipped = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        saved = [t.detach().clone() for t in guarded]
        try:
            step_stats, norm = take_update(state, x, y, model_params, trainer_params)
        except DivergenceError as exc:
            if skipped >= allowance:
                raise _past_the_limit(exc, cfg, skipped, allowance, state.epoch + 1) from None
            with torch.no_grad():
                for tensor, before in zip(guarded, saved):
                    tensor.copy_(before)
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            state.skipped.append({"epoch": state.epoch + 1, "step": state.global_step + 1,
                                  "reason": first_line(exc)})
            step_stats, took = {"skipped": 1.0}, False
        else:
            step_stats["update_norm"] = norm
            # the paper's clipping: torch's clip_grad_norm_, the model's and the trainer's
            # parameters separately; a total norm that overflows float32 scales the update to
            # zero
            if cfg.metagrad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model_params, max_norm=cfg.metagrad_clip)
                if trainer_params:
                    torch.nn.utils.clip_grad_norm_(trainer_params, max_norm=cfg.metagrad_clip)
            optimizer.step()
            stats.add(step_stats)
            took = True
        # a skipped batch's time passes too: the schedule goes on as if its step had been taken
        if scheduler is not None:
            scheduler.step()
        state.global_step += 1
        steps += 1
        if took and probe is not None and probe.due(state.global_step):
            step_stats.update(probe.measure("align_step/"))  # for callbacks, not the epoch means
        cbs.on_step_end(state, step_stats)
        if state.stop_reason is not None:
            break
    elapsed = time.perf_counter() - start
    record = stats.summary()
    record["epoch_time"] = elapsed
    record["steps_per_s"] = steps / elapsed if elapsed > 0 else 0.0
    record["lr"] = optimizer.param_groups[0]["lr"]
    record["peak_memory_mb"] = peak_memory_mb(device)
    record["skipped_steps"] = skipped
    return record


def take_update(state: FitState, x, y, model_params, trainer_params):
    """This batch's update in `.grad` (and the trainer's rules applied): (stats, its norm).
    Raises DivergenceError when a solve or the update is not finite."""
    trainer = state.trainer
    trainer.pre_update()
    state.optimizer.zero_grad(set_to_none=True)
    step_stats = trainer.compute_update(x, y)
    trainer.post_update()
    norm = update_norm(model_params + trainer_params)
    # only an element that is not finite is a divergence: a norm too large for float64 (of a
    # float64 update) is logged as inf, and clipping handles it as the paper's loop does
    if not math.isfinite(norm) and not update_is_finite(model_params + trainer_params):
        raise DivergenceError(
            f"the update is not finite at step {state.global_step + 1} "
            f"(epoch {state.epoch + 1}); lower the learning rate, dt or alpha",
            phase="update", iteration=state.global_step + 1)
    return step_stats, norm


def _past_the_limit(exc: DivergenceError, cfg: RunConfig, skipped: int, allowance: int,
                    epoch: int) -> DivergenceError:
    """The divergence that ends a run: `exc` itself when skipping is off, else `exc` with how
    many steps of the epoch were skipped before it."""
    if allowance == 0:
        return exc
    return DivergenceError(
        f"{first_line(exc)} — a step of epoch {epoch} not finite after {skipped} "
        f"skipped (skip_limit={cfg.skip_limit:g} allows {allowance} per epoch); raise "
        "--skip_limit to skip more, or lower the learning rate, dt or alpha",
        phase=exc.phase, iteration=exc.iteration)


# ------------------------------------------------------------------ trained models
def save_model_file(path: str | os.PathLike, state: FitState) -> None:
    """A trained model with its trainer state (feedback weights, Q) and resolved config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "lcp-model-1", "config": state.cfg.to_dict(),
                "model": state.model.state_dict(), "trainer": state.trainer.state_dict()}, path)


def load_model_file(path: str | os.PathLike, input_shape, num_classes: int = 10,
                    device: str = "cpu"):
    """(cfg, model, trainer) from `save_model_file` or from an end-of-epoch checkpoint."""
    payload = load_trusted_payload(path, device, "model file")
    if not isinstance(payload, dict) or payload.get("format") not in ("lcp-model-1",
                                                                     "lcp-checkpoint-1"):
        raise LcpError(f"{path} is not an lcp model file")
    cfg = RunConfig.from_dict(payload["config"])
    model = build_model(cfg, input_shape, num_classes).to(device)
    model.load_state_dict(payload["model"])
    trainer = build_trainer(cfg, model).to(device)
    trainer.load_state_dict(payload["trainer"])
    return cfg, model, trainer
