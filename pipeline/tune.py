"""`lcp tune`: an Optuna study over one experiment row's hyper-parameters, one process per trial.

    plan = prepare(manifest.get("t1-ff-lcp-di"), overrides={}, params=["k_i", "alpha"])
    storage = resolve_storage(None, tracking_uri)        # a journal file beside the MLflow store
    study = open_study(plan, storage, "t1-ff-lcp-di", pruner="median")
    summary = Tuner(plan, study, ..., trials=50, workers=2).run()
    export_row(manifest_path, plan, study)               # row t1-ff-lcp-di-tuned

What a trial does: the row's config (first seed), with `validation_split=0.1` of the training set
held out (fixed `validation_seed`, the same for every trial) and `eval_epochs=1`, plus the trial's
parameters, trained by `lcp.fit` in a fresh process (`python -m pipeline.tune run-trial SPEC`), so
memory (GPU memory included) never grows across trials. Only the validation split is evaluated —
never the test set. After every epoch the validation accuracy is reported to Optuna and the
pruner may stop the trial (PRUNED). Dynamics that leave the finite numbers (`DivergenceError`, a
non-finite validation loss) end the trial PRUNED with the reason in the user attribute
`lcp.end_reason` (PRUNED rather than FAILED, so the sampler learns to avoid the region); NaN is
never reported. Any other error ends it FAILED with the reason; the study goes on.

Counting: `--trials N` is the study's total. Trials that count are COMPLETE, PRUNED and FAILED
ones, plus RUNNING and WAITING ones (they will end as one of those); a trial interrupted by a killed
process is marked FAILED with `lcp.interrupted` and its parameters are enqueued again (a WAITING
trial), and it does not count. A trial is interrupted when its process is gone (same host: its pid
is not alive) or its heartbeat (`lcp.heartbeat`, written every 30 s) is older than 10 minutes.

MLflow (through `pipeline.tracking.Tracker`, with explicit URI and run ids): experiment
`lcp-tune-<id>`, one parent run per study (its id kept in the study's user attributes, so later
calls continue it), one nested run per trial (tag `mlflow.parentRunId`), created by the parent
before the trial's process starts. The best trial's run is tagged `lcp.best=true`; the parent run
gets the optimisation history, the parameter importances and `trials.csv` as artifacts.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from lcp.callbacks import Callback
from lcp.config import ConfigError, RunConfig, parse_bool
from lcp.errors import DivergenceError, LcpError
from pipeline.scheduler import signal_process_group, visible_gpus

OBJECTIVE = "eval_val/accuracy"
DEFAULT_VALIDATION_SPLIT = 0.1
DEFAULT_VALIDATION_SEED = 0
# What every trial sets unless --set says otherwise.
TUNE_DEFAULTS: dict[str, Any] = {
    "validation_split": DEFAULT_VALIDATION_SPLIT,
    "validation_seed": DEFAULT_VALIDATION_SEED,
    "eval_epochs": 1,
}
JOURNAL_NAME = "optuna-journal.log"
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
STOP_GRACE_S = 30.0
EXPORT_SUFFIX = "tuned"
SPEC_NAME = "spec.json"
LOG_NAME = "trial.log"
IDENTITY_FIELDS = ("seed", "model", "trainer")
# Settings that say where or on what a trial runs, not what it computes.
MACHINE_FIELDS = ("data_dir", "device", "out_dir", "save_model")
DEFAULT_PARAMS = ("k_i", "k_p", "alpha")

# Trial user attributes
A_HOST, A_PID, A_HEARTBEAT = "lcp.host", "lcp.pid", "lcp.heartbeat"
A_RUN, A_REASON, A_DURATION = "lcp.mlflow_run_id", "lcp.end_reason", "lcp.duration_s"
A_DIVERGED, A_INTERRUPTED, A_SURPLUS = "lcp.diverged", "lcp.interrupted", "lcp.surplus"
A_RETRY_OF, A_EPOCHS = "lcp.retry_of", "lcp.epochs"
# Study user attributes
S_ID, S_CONFIG, S_SPACE = "lcp.id", "lcp.base_config", "lcp.search_space"
S_PARENT_RUN, S_TRACKING = "lcp.mlflow_parent_run_id", "lcp.tracking_uri"

_FIELD_KINDS: dict[str, str] = {f.name: str(f.type) for f in fields(RunConfig)}


class TuneError(LcpError):
    """`lcp tune` cannot do what was asked (one message: the problem and the fix)."""


class StorageError(TuneError):
    """The Optuna storage cannot be opened."""


# ====================================================================== search spaces


def default_space(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The search space of a row that declares none.

    The integral controller is explicit Euler: uᵢ' = (1 − dt/τ_u·α)·uᵢ − dt/τ_u·g, which is stable
    only for α < 2·τ_u/dt (at dt = 1 the dynamics diverge for α ≥ 2), so α stays below
    1.5·τ_u/dt. k_i ∈ [0.1, 1.5] (log) and k_p ∈ [0, 1] keep the controller loop stable on MNIST.
    """
    alpha_high = round(1.5 * cfg.tau_u / cfg.dt, 6)
    alpha = {"type": "float", "low": min(0.01, alpha_high / 10), "high": alpha_high, "log": True}
    if cfg.trainer in ("lcp-di", "lcp-kp", "lcp-lf"):
        return {
            "k_i": {"type": "float", "low": 0.1, "high": 1.5, "log": True},
            "k_p": {"type": "float", "low": 0.0, "high": 1.0, "log": False},
            "alpha": alpha,
        }
    if cfg.trainer == "lcp-ebd":
        return {"alpha": {"type": "float", "low": 0.01, "high": 1.5, "log": True}}
    return {}


def parse_space_option(text: str) -> tuple[str, dict[str, Any]]:
    """--space 'alpha=0.01:1.5:log' | 'k_p=0:1' | 'solver=vanilla,anderson' → (name, entry)."""
    if not isinstance(text, str) or "=" not in text:
        raise TuneError(f"--space {text!r}: expected PARAM=LOW:HIGH[:log] or PARAM=A,B,... "
                        "(e.g. --space alpha=0.01:1.5:log)")
    name, value = (part.strip() for part in text.split("=", 1))
    name = name if name in _FIELD_KINDS else name.replace("-", "_")
    _check_param_name(name, f"--space {text!r}")
    kind = _FIELD_KINDS[name]
    if ":" in value:
        parts = [p.strip() for p in value.split(":")]
        log = len(parts) == 3 and parts[2].lower() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise TuneError(f"--space {text!r}: a range is LOW:HIGH or LOW:HIGH:log")
        if kind not in ("int", "float"):
            raise TuneError(f"--space {text!r}: {name} takes {kind} values, not a range; give "
                            f"choices instead ({name}=A,B,...)")
        bounds = []
        for part in parts[:2]:
            try:
                number = float(part)
            except ValueError:
                raise TuneError(f"--space {text!r}: {part!r} is not a number") from None
            if kind == "int":
                if not number.is_integer():
                    raise TuneError(f"--space {text!r}: {name} takes integers (got {part})")
                number = int(number)
            bounds.append(number)
        return name, {"type": kind, "low": bounds[0], "high": bounds[1], "log": log}
    choices = [p.strip() for p in value.split(",") if p.strip()]
    if not choices:
        raise TuneError(f"--space {text!r}: give LOW:HIGH[:log] or choices A,B,...")
    typed: list[Any] = []
    for choice in choices:
        try:
            typed.append(int(float(choice)) if kind == "int" else float(choice) if kind == "float"
                         else parse_bool(choice) if kind == "bool" else choice)
        except (ValueError, ConfigError):
            raise TuneError(f"--space {text!r}: {choice!r} is not a valid {kind} for "
                            f"{name}") from None
    if len({repr(c) for c in typed}) != len(typed):
        raise TuneError(f"--space {text!r}: a choice is repeated")
    return name, {"type": "categorical", "choices": typed}


def _check_param_name(name: str, where: str) -> None:
    if name in IDENTITY_FIELDS:
        raise TuneError(f"{where}: {name!r} cannot be tuned: it defines the experiment")
    if name not in _FIELD_KINDS:
        raise TuneError(f"{where}: unknown parameter {name!r}; a parameter is a run setting "
                        "(RunConfig field): " + ", ".join(
                            n for n in _FIELD_KINDS if n not in IDENTITY_FIELDS))


def check_space(space: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any],
                exp_id: str) -> None:
    """Raise TuneError when an entry is not a valid range for the row (bounds, log, values)."""
    for name, entry in space.items():
        where = f"search range for {name} ({exp_id})"
        _check_param_name(name, where)
        kind = entry.get("type")
        if kind == "categorical":
            values = list(entry.get("choices") or [])
            if not values:
                raise TuneError(f"{where}: no choices")
        elif kind in ("int", "float"):
            low, high, log = entry.get("low"), entry.get("high"), bool(entry.get("log"))
            for bound in (low, high):
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not \
                        math.isfinite(bound):
                    raise TuneError(f"{where}: bounds must be finite numbers (got low={low!r}, "
                                    f"high={high!r})")
            if not low < high:
                raise TuneError(f"{where}: low must be < high (got low={low}, high={high}); "
                                f"e.g. --space {name}=0.01:1.5:log")
            if log and not low > 0:
                raise TuneError(f"{where}: a log-scale range needs low > 0 (got low={low}); "
                                "use a positive low or drop :log")
            field_kind = _FIELD_KINDS[name]
            if field_kind not in ("int", "float") or (field_kind == "int" and kind == "float"):
                raise TuneError(f"{where}: {name} takes {field_kind} values; a {kind} range does "
                                "not fit it")
            values = [low, high]
        else:
            raise TuneError(f"{where}: type must be float, int or categorical (got {kind!r})")
        for value in values:
            try:
                RunConfig.from_dict({**base, name: value})
            except ConfigError as exc:
                raise TuneError(f"{where}: {value!r} is not a valid {name}: {exc}") from None


def stability_warnings(space: Mapping[str, Mapping[str, Any]], cfg: RunConfig) -> list[str]:
    """Ranges known to reach diverging dynamics (they are allowed: such trials end PRUNED)."""
    out = []
    entry = space.get("alpha")
    if (entry and entry.get("type") != "categorical" and cfg.trainer in
            ("lcp-di", "lcp-kp", "lcp-lf")):
        limit = 2 * cfg.tau_u / cfg.dt
        if entry["high"] >= limit:
            out.append(f"alpha up to {entry['high']} reaches the unstable region of the explicit-"
                       f"Euler dynamics (alpha ≥ 2·tau_u/dt = {limit:g}); those trials will end "
                       "PRUNED (diverged)")
    return out


def distributions(space: Mapping[str, Mapping[str, Any]]) -> dict:
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)

    out = {}
    for name, entry in space.items():
        if entry["type"] == "categorical":
            out[name] = CategoricalDistribution(list(entry["choices"]))
        elif entry["type"] == "int":
            out[name] = IntDistribution(int(entry["low"]), int(entry["high"]),
                                        log=bool(entry.get("log")))
        else:
            out[name] = FloatDistribution(float(entry["low"]), float(entry["high"]),
                                          log=bool(entry.get("log")))
    return out


def describe_space(space: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name, entry in space.items():
        if entry["type"] == "categorical":
            parts.append(f"{name} ∈ {{{', '.join(map(str, entry['choices']))}}}")
        else:
            scale = " log" if entry.get("log") else ""
            parts.append(f"{name} ∈ [{entry['low']:g}, {entry['high']:g}]{scale}")
    return "; ".join(parts)


# ====================================================================== the plan


@dataclass
class TunePlan:
    """What a study tunes: the row, its trial config without the searched parameters, the space."""

    exp: Any  # pipeline.manifest.Experiment
    base: RunConfig  # the row's first seed, the tuning defaults, --set
    space: dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)  # --set (and --data-dir) as given
    warnings: list[str] = field(default_factory=list)

    @property
    def identity(self) -> dict[str, Any]:
        """The settings a study is tied to (what trials compute), without the searched ones."""
        return {k: v for k, v in self.base.to_dict().items()
                if k not in self.space and k not in MACHINE_FIELDS}

    def trial_config(self, params: Mapping[str, Any]) -> RunConfig:
        return self.base.replace(**dict(params))


def prepare(exp, overrides: Mapping[str, Any] | None = None, params: Iterable[str] | None = None,
            spaces: Iterable[str] = ()) -> TunePlan:
    """The plan for tuning row `exp`: its config and search space (the row's `search:` block, or
    the LCP defaults when it has none; `--space` entries added; `--params` selecting)."""
    overrides = dict(overrides or {})
    seed = exp.seeds[0] if exp.seeds else 0
    base = exp.config(seed, {**TUNE_DEFAULTS, **overrides, "save_model": False})
    if not base.validation_split > 0:
        raise TuneError("tuning needs a validation split of the training set (the objective); "
                        "drop --set validation_split=0 (default 0.1)")
    space = dict(exp.search) if exp.search else default_space(base)
    source = "the row's search: block" if exp.search else "the defaults"
    for text in spaces:
        name, entry = parse_space_option(text)
        space[name] = entry
    if params is not None:
        wanted = [p.strip() for p in params if p and p.strip()]
        if not wanted:
            raise TuneError("--params is empty; give parameter names separated by commas, e.g. "
                            "--params k_i,k_p,alpha")
        unknown = [p for p in wanted if p not in space]
        if unknown:
            valid = ", ".join(space) or "none"
            raise TuneError(
                f"unknown parameter(s) {', '.join(unknown)} for {exp.id}: the parameters with a "
                f"search space ({source}) are: {valid}. Declare others under `search:` of the row "
                f"in experiments.yaml, or give a range with --space {unknown[0]}=LOW:HIGH[:log]")
        space = {p: space[p] for p in wanted}
    if not space:
        raise TuneError(
            f"{exp.id} (trainer {base.trainer}) has no search space: the default space (k_i, k_p,"
            " alpha) is for LCP trainers. Declare one under `search:` of the row in "
            "experiments.yaml, or give --space PARAM=LOW:HIGH[:log]")
    fixed = [p for p in space if p in overrides]
    if fixed:
        raise TuneError(f"{', '.join(fixed)} is both tuned and fixed by --set; drop the --set or "
                        "leave it out of --params")
    check_space(space, base.to_dict(), exp.id)
    return TunePlan(exp=exp, base=base, space=space, overrides=overrides,
                    warnings=stability_warnings(space, base))


# ====================================================================== storage


@dataclass(frozen=True)
class StorageSpec:
    """Where the study lives: a journal file (`kind='journal'`, absolute path) or a database URL."""

    kind: str
    target: str

    def display(self) -> str:
        return (f"journal file {self.target}" if self.kind == "journal"
                else mask_url(self.target))

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.target}


def mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def default_journal_path(tracking_uri: str | None) -> Path:
    """`optuna-journal.log` beside the embedded MLflow database, else in the working folder."""
    from pipeline.tracking import sqlite_path

    db = sqlite_path(tracking_uri) if tracking_uri else None
    folder = db.parent if db is not None else Path.cwd()
    return folder / JOURNAL_NAME


def resolve_storage(option: str | None, tracking_uri: str | None = None) -> StorageSpec:
    """--storage: a database URL (sqlite:///, postgresql://, mysql://, ...) or a journal file path
    (also `journal:PATH`); default: the journal file beside the MLflow store."""
    if option is None or not option.strip():
        return StorageSpec("journal", str(default_journal_path(tracking_uri)))
    text = option.strip()
    if text.startswith("journal:"):
        text = text[len("journal:"):]
        if text.startswith("//"):
            text = text[2:]
        return StorageSpec("journal", os.path.abspath(os.path.expanduser(text)))
    if "://" in text:
        scheme = text.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme == "redis":
            raise StorageError(f"--storage {mask_url(text)}: Redis is not supported; use a "
                               "database URL (postgresql://...) or a journal file path")
        if scheme in ("http", "https", "file"):
            raise StorageError(f"--storage {mask_url(text)}: not an Optuna storage; give a "
                               "database URL (sqlite:///study.db, postgresql://user@host/db) or a "
                               "journal file path (e.g. ./optuna-journal.log)")
        return StorageSpec("rdb", text)
    return StorageSpec("journal", os.path.abspath(os.path.expanduser(text)))


def open_storage(spec: StorageSpec):
    """The Optuna storage behind `spec` (StorageError with the fix when it cannot be opened)."""
    import optuna

    if spec.kind == "journal":
        path = Path(spec.target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalStorage
        except ImportError:  # Optuna < 4
            from optuna.storages import JournalFileStorage as JournalFileBackend  # type: ignore
            from optuna.storages import JournalStorage
        except OSError as exc:
            raise StorageError(f"cannot create the folder of the journal file {path}: "
                               f"{exc.strerror or exc}; give --storage PATH on a writable local "
                               "disk") from None
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StorageError(f"the journal file {path} is not readable and writable; fix its "
                               "permissions or give another --storage PATH")
        if not path.exists() and not os.access(path.parent, os.W_OK):
            raise StorageError(f"cannot create the journal file {path} (folder not writable); "
                               "give --storage PATH on a writable local disk")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
            raise StorageError(f"cannot read the journal file {path}: {_first_line(exc)}; give "
                               "another --storage PATH") from None
    url = spec.target
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    engine_kwargs: dict[str, Any] = {}
    if scheme in ("postgresql", "postgres", "mysql", "mariadb"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}
    elif scheme == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
    from pipeline.tracking import first_open_lock

    try:
        with first_open_lock(url):  # one process at a time creates a SQLite storage's tables
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or _first_line(exc)
        hint = ("pip install -e \".[postgres]\" (psycopg2-binary and psycopg: SQLAlchemy "
                "2.1 opens postgresql:// with psycopg)"
                if scheme.startswith("postgres") else "install the database driver for "
                f"{scheme!r} (see SQLAlchemy's dialect documentation)")
        raise StorageError(f"cannot open the Optuna storage {mask_url(url)}: its database driver "
                           f"is not installed ({missing}); {hint}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy errors (refused, auth, unknown db)
        raise StorageError(
            f"cannot open the Optuna storage {mask_url(url)}: {_first_line(exc)}. Check the URL "
            "(dialect://user:password@host:port/database), that the database server is running "
            "and reachable from here, or leave --storage out to use a journal file on local "
            "disk") from None
    return optuna.storages.get_storage(storage)


def filesystem_type(path: str | os.PathLike) -> str | None:
    """The file system type of the mount holding `path` (Linux /proc/mounts), None if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


def storage_warnings(spec: StorageSpec, workers: int) -> list[str]:
    out = []
    if spec.kind == "journal":
        kind = filesystem_type(Path(spec.target).parent)
        if kind and (kind.startswith("nfs") or kind in ("cifs", "smb3", "fuse.sshfs", "lustre")):
            out.append(f"the journal file {spec.target} is on a network file system ({kind}): "
                       "journal writes can be lost there (optuna #5138); use a local disk, or a "
                       "database URL (--storage postgresql://...) for several machines")
    elif spec.target.startswith("sqlite") and workers > 1:
        out.append("SQLite is not recommended for parallel optimisation (optuna #4034); leave "
                   "--storage out for a journal file, or use a database server")
    return out


# ====================================================================== the study


def make_pruner(name: str, num_epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, num_epochs),
                                              reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TuneError(f"--pruner {name!r} is not valid; pruners are: {', '.join(PRUNERS)}")


def make_sampler():
    import optuna

    return optuna.samplers.TPESampler(constant_liar=True)


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_study(plan: TunePlan | None, storage, name: str, *, pruner: str = "median",
               create: bool = True, exp_id: str | None = None):
    """Create or load study `name`; a loaded one must have been made for the same row, settings
    and search space (TuneError naming the differences otherwise)."""
    import optuna

    quiet_optuna()
    num_epochs = plan.base.num_epochs if plan is not None else 1
    kwargs = dict(storage=storage, study_name=name, sampler=make_sampler(),
                  pruner=make_pruner(pruner, num_epochs))
    exp_id = exp_id or (plan.exp.id if plan is not None else None)
    try:
        if create:
            study = optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)
        else:
            study = optuna.load_study(**kwargs)
    except KeyError:
        raise TuneError(f"no study {name!r} in this storage: run `lcp tune {exp_id} --trials N` "
                        "first (with the same --storage and --study)") from None
    except ValueError as exc:
        raise TuneError(f"study {name!r}: {exc}") from None
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise TuneError(f"study {name!r} exists but does not maximise one value: it was not made "
                        "by `lcp tune`; give another --study NAME")
    attrs = study.user_attrs
    if S_ID in attrs and exp_id is not None and attrs[S_ID] != exp_id:
        raise TuneError(f"study {name!r} tunes {attrs[S_ID]}, not {exp_id}; give another "
                        f"--study NAME (e.g. --study {exp_id})")
    if plan is None:
        return study
    identity = json.loads(json.dumps(plan.identity, default=str))
    space = json.loads(json.dumps(plan.space))
    if S_CONFIG not in attrs:
        if study.trials and S_ID not in attrs:
            raise TuneError(f"study {name!r} exists with trials but was not made by `lcp tune`; "
                            "give another --study NAME")
        study.set_user_attr(S_ID, plan.exp.id)
        study.set_user_attr(S_CONFIG, identity)
        study.set_user_attr(S_SPACE, space)
        return study
    old = attrs.get(S_CONFIG) or {}
    defaults = json.loads(json.dumps(RunConfig.from_dict({"model": "ff"}).to_dict(), default=str))
    missing = object()
    changed = []
    for k in sorted(set(old) | set(identity)):
        before, now = old.get(k, missing), identity.get(k, missing)
        if before is missing and now == defaults.get(k, missing):
            continue  # a setting added to RunConfig since the study began, at its default
        if before != now:
            shown = ["(none)" if v is missing else repr(v) for v in (before, now)]
            changed.append(f"{k}: {shown[0]} → {shown[1]}")
    if changed:
        raise TuneError(f"study {name!r} was made with other settings ({'; '.join(changed)}); "
                        "give the same --set/--params as before, or start a new study with "
                        "--study NAME")
    if attrs.get(S_SPACE) != space:
        raise TuneError(f"study {name!r} searches another space ({describe_space(attrs[S_SPACE])})"
                        f", not {describe_space(plan.space)}; give the same --params/--space as "
                        "before, or start a new study with --study NAME")
    return study


def counts_toward_total(trial) -> bool:
    """COMPLETE, PRUNED, FAILED, RUNNING and WAITING trials count; interrupted (re-enqueued) and
    surplus ones do not."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return not (trial.user_attrs.get(A_INTERRUPTED) or trial.user_attrs.get(A_SURPLUS))
    return True


def tally(trials) -> dict[str, int]:
    from optuna.trial import TrialState

    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0,
           "interrupted": 0, "diverged": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            out["complete"] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
            out["diverged"] += bool(t.user_attrs.get(A_DIVERGED))
        elif t.state == TrialState.FAIL:
            if counts_toward_total(t):
                out["failed"] += 1
            elif t.user_attrs.get(A_INTERRUPTED):
                out["interrupted"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    out["finished"] = out["complete"] + out["pruned"] + out["failed"]
    out["counted"] = out["finished"] + out["running"] + out["waiting"]
    return out


def trial_id(study, storage, number: int) -> int:
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def stale_reason(trial, now: float | None = None, host: str | None = None,
                 stale_after: float = STALE_AFTER_S) -> str | None:
    """Why a RUNNING trial is abandoned (its process is gone or silent), None if it is alive."""
    now = time.time() if now is None else now
    host = host or socket.gethostname()
    attrs = trial.user_attrs
    t_host, t_pid = attrs.get(A_HOST), attrs.get(A_PID)
    beat = attrs.get(A_HEARTBEAT)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if t_host == host and t_pid is not None and not pid_alive(t_pid):
        return f"its process ({t_host} pid {t_pid}) is gone"
    if beat is not None and now - float(beat) > stale_after:
        who = f" ({t_host} pid {t_pid})" if t_host else ""
        return f"no heartbeat for {int(now - float(beat))} s{who}"
    return None


def mark_interrupted(study, storage, trial, reason: str, tracker=None) -> bool:
    """A RUNNING trial whose process is gone: FAILED with `lcp.interrupted`, its parameters
    enqueued again, its MLflow run KILLED. False when another process got there first."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    tid = trial_id(study, storage, trial.number)
    try:
        storage.set_trial_user_attr(tid, A_INTERRUPTED, reason)
        storage.set_trial_user_attr(tid, A_REASON, f"interrupted: {reason}")
        storage.set_trial_state_values(tid, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    study.enqueue_trial(dict(trial.params), user_attrs={A_RETRY_OF: trial.number})
    run_id = trial.user_attrs.get(A_RUN)
    if tracker is not None and run_id:
        _safe(lambda: tracker.set_tags(run_id, {"optuna.state": "FAIL", "lcp.interrupted": "true",
                                                "killed_reason": reason}))
        _safe(lambda: tracker.terminate(run_id, "KILLED"))
    return True


def recover_stale(study, storage, *, skip: Iterable[int] = (), tracker=None,
                  echo: Callable[[str], None] | None = None) -> int:
    """Mark every abandoned RUNNING trial interrupted and enqueue it again; returns how many."""
    from optuna.trial import TrialState

    skip = set(skip)
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in skip:
            continue
        reason = stale_reason(t)
        if reason is None:
            continue
        if mark_interrupted(study, storage, t, reason, tracker):
            count += 1
            if echo:
                echo(f"trial {t.number} was left RUNNING ({reason}): marked FAILED "
                     "(interrupted) and its parameters enqueued again")
    return count


# ====================================================================== MLflow bridge


def tune_experiment_name(exp_id: str) -> str:
    return f"lcp-tune-{exp_id}"


def ensure_parent_run(tracker, study, plan: TunePlan, storage: StorageSpec, pruner: str) -> str:
    """The study's MLflow parent run (created once, kept in the study's user attributes)."""
    exp_mlflow = tracker.ensure_experiment(tune_experiment_name(plan.exp.id))
    attrs = study.user_attrs
    run_id = attrs.get(S_PARENT_RUN) if attrs.get(S_TRACKING) == tracker.uri else None
    if run_id:
        try:
            run = tracker.get_run(run_id)
            if run.info.lifecycle_stage == "deleted":
                run_id = None
        except Exception:  # noqa: BLE001 - not in this store (any more)
            run_id = None
    if run_id:
        tracker.set_status(run_id, "RUNNING")
        return run_id
    tags = {
        "lcp.kind": "tune-study", "lcp.id": plan.exp.id, "lcp.study": study.study_name,
        "lcp.storage": storage.display(), "lcp.search_space": json.dumps(plan.space),
        "lcp.pruner": pruner, "lcp.objective": f"{OBJECTIVE} (validation_split "
        f"{plan.base.validation_split}, validation_seed {plan.base.validation_seed})",
        "mlflow.note.content": f"Optuna study {study.study_name} for {plan.exp.id} "
                               f"({plan.exp.label}): {describe_space(plan.space)}",
    }
    params = {**plan.base.to_dict(), **{f"search/{k}": json.dumps(v) for k, v in
                                        plan.space.items()}}
    params = {k: v for k, v in params.items() if k not in plan.space and k not in ("data_dir",)}
    key = f"{storage.display()}#{getattr(study, '_study_id', study.study_name)}"
    tags["lcp.study_key"] = key
    run_id = tracker.create_run(exp_mlflow, study.study_name, tags=tags, params=params)
    run_id = _elect_parent_run(tracker, exp_mlflow, key, run_id)
    study.set_user_attr(S_PARENT_RUN, run_id)
    study.set_user_attr(S_TRACKING, tracker.uri)
    return run_id


def _elect_parent_run(tracker, exp_mlflow: str, key: str, mine: str) -> str:
    """Tuners that start the same new study at the same moment (on several machines, one
    storage) each create a parent run: all keep the oldest of the study's (`lcp.study_key`: the
    storage and the study's id in it) and the others delete theirs."""
    runs = [r for r in tracker.search_runs([exp_mlflow])
            if r.data.tags.get("lcp.kind") == "tune-study"
            and r.data.tags.get("lcp.study_key") == key]
    if not runs:
        return mine
    winner = min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)).info.run_id
    if winner != mine:
        _safe(lambda: tracker._call(lambda: tracker.client.delete_run(mine)))
    return winner


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop the study
        print(f"warning: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ====================================================================== slots


@dataclass
class Slot:
    index: int
    gpu: str | None
    threads: int

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}" if self.gpu is not None else f"cpu#{self.index}"

    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": self.gpu if self.gpu is not None else "",
                "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}


@dataclass
class RaySlot(Slot):
    """One of the `--workers` trials at a time of `--executor ray` (Ray places the task)."""

    @property
    def label(self) -> str:
        return f"ray#{self.index}"


def make_slots(workers: int, gpus: list[str] | None = None) -> list[Slot]:
    """`workers` places to run trials: spread over the visible GPUs (round robin), else CPU
    workers; the CPU threads are split between them."""
    if workers < 1:
        raise TuneError(f"--workers must be ≥ 1 (got {workers})")
    gpus = visible_gpus() if gpus is None else gpus
    threads = max(1, (os.cpu_count() or 1) // workers)
    return [Slot(i, gpus[i % len(gpus)] if gpus else None, threads) for i in range(workers)]


# ====================================================================== the parent: Tuner


@dataclass
class Child:
    number: int
    tid: int
    run_id: str | None
    process: Any  # subprocess.Popen, or pipeline.ray_executor.RayProcess (--executor ray)
    slot: Slot
    log_path: Path
    log: Any
    started: float
    params: dict[str, Any]
    stopping: bool = False


@dataclass
class TuneSummary:
    study: str
    storage: str
    counts: dict[str, int]
    started: int
    interrupted_recovered: int
    best: Any  # FrozenTrial or None
    parent_run_id: str | None
    artifacts: list[str]
    stopped: str | None
    notes: list[str] = field(default_factory=list)


class Tuner:
    """Runs trials of one study until it holds `trials` counted trials (or `timeout` passes)."""

    def __init__(self, plan: TunePlan, study, storage, storage_spec: StorageSpec, *,
                 trials: int, workers: int = 1, timeout: float | None = None,
                 pruner: str = "median", tracker=None, runs_dir: str | Path = "lcp-runs",
                 echo: Callable[[str], None] = print, gpus: list[str] | None = None,
                 executor=None):
        self.plan, self.study, self.storage, self.spec = plan, study, storage, storage_spec
        self.trials, self.timeout, self.pruner = trials, timeout, pruner
        self.tracker, self.echo = tracker, echo
        # executor: None runs trials as processes here; a pipeline.ray_executor.RayExecutor runs
        # each as a Ray task (the same process, on some node), `workers` of them at a time.
        self.executor = executor
        if executor is not None:
            if workers < 1:
                raise TuneError(f"--workers must be ≥ 1 (got {workers})")
            self.slots = [RaySlot(i, None, executor.threads) for i in range(workers)]
        else:
            self.slots = make_slots(workers, gpus)
        self.free = list(self.slots)
        self.folder = (Path(runs_dir) / tune_experiment_name(plan.exp.id)
                       / _safe_name(study.study_name)).resolve()
        self.running: dict[int, Child] = {}
        self.stop_reason: str | None = None
        self.parent_run_id: str | None = None
        self.mlflow_experiment: str | None = None
        self.best_number: int | None = None
        self.started = 0
        self.recovered = 0
        self.distributions = distributions(plan.space)
        self.host = socket.gethostname()

    # ------------------------------------------------------------------ main loop
    def run(self) -> TuneSummary:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.tracker is not None:
            self.parent_run_id = ensure_parent_run(self.tracker, self.study, self.plan,
                                                   self.spec, self.pruner)
            self.mlflow_experiment = self.tracker.ensure_experiment(
                tune_experiment_name(self.plan.exp.id))
            best = self._best()
            self.best_number = int(self.tracker.get_run(self.parent_run_id).data.tags.get(
                "lcp.best_trial", -1)) if best is not None else None
        self.recovered += recover_stale(self.study, self.storage, tracker=self.tracker,
                                        echo=self.echo)
        counts = tally(self.study.get_trials(deepcopy=False))
        if counts["counted"] >= self.trials and not counts["waiting"]:
            self.echo(f"the study already has {counts['counted']} trial(s) (≥ --trials "
                      f"{self.trials}): nothing to run")
        else:
            todo = max(0, self.trials - counts["counted"]) + counts["waiting"]
            self.echo(f"running {todo} trial(s) to reach {self.trials} "
                      f"({counts['finished']} finished, {counts['running']} running elsewhere, "
                      f"{counts['waiting']} enqueued) on {len(self.slots)} worker(s)")
        start = time.monotonic()
        last_recovery = time.monotonic()
        previous = self._install_signals()
        try:
            while True:
                self._reap()
                if self.stop_reason:
                    break
                timed_out = self.timeout is not None and time.monotonic() - start >= self.timeout
                if timed_out and not self.running:
                    counts = tally(self.study.get_trials(deepcopy=False))
                    if counts["waiting"] or counts["counted"] < self.trials:
                        self.echo(f"--timeout {self.timeout:g} s reached: no new trials "
                                  f"({counts['counted']} of {self.trials}); run again to go on")
                    break
                if not timed_out and self.free:
                    if time.monotonic() - last_recovery > HEARTBEAT_S:
                        self.recovered += recover_stale(
                            self.study, self.storage, skip=self.running, tracker=self.tracker,
                            echo=self.echo)
                        last_recovery = time.monotonic()
                    trials = self.study.get_trials(deepcopy=False)
                    counts = tally(trials)
                    if counts["waiting"] or counts["counted"] < self.trials:
                        if self._start_trial():
                            continue
                        if self.stop_reason is None and not self.running:
                            break
                    elif not self.running:
                        break
                time.sleep(0.2)
        except BaseException:
            # A failure of the tuner itself (e.g. the storage went away): stop the trials'
            # processes so their trials are enqueued again rather than orphaned.
            self.stop_reason = self.stop_reason or "an error in the tuner"
            raise
        finally:
            if self.stop_reason:
                self._stop_children()
            self._restore_signals(previous)
        return self._finish()

    # ------------------------------------------------------------------ one trial
    def _start_trial(self) -> bool:
        """Ask the next trial and start its process; False when it turned out surplus."""
        from optuna.trial import TrialState

        trial = self.study.ask(self.distributions)
        number = trial.number
        tid = trial_id(self.study, self.storage, number)
        trial.set_user_attr(A_HOST, self.host)
        trial.set_user_attr(A_PID, os.getpid())
        trial.set_user_attr(A_HEARTBEAT, time.time())
        counted = sorted(t.number for t in self.study.get_trials(deepcopy=False)
                         if counts_toward_total(t))
        if number in counted and counted.index(number) >= self.trials:
            # Another process (machine) asked at the same time and the total is reached.
            trial.set_user_attr(A_SURPLUS, True)
            self.study.tell(trial, state=TrialState.FAIL)
            return False
        params = dict(trial.params)
        retry_of = trial.user_attrs.get(A_RETRY_OF)
        try:
            cfg = self.plan.trial_config(params)
        except ConfigError as exc:
            reason = f"invalid config: {exc}"
            trial.set_user_attr(A_REASON, reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self.echo(f"trial {number} FAILED: {reason}")
            return True
        folder = self.folder / f"trial-{number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        cfg = cfg.replace(out_dir=str(folder))
        run_id = None
        if self.tracker is not None:
            tags = {"mlflow.parentRunId": self.parent_run_id, "lcp.kind": "tune-trial",
                    "lcp.id": self.plan.exp.id, "lcp.study": self.study.study_name,
                    "optuna.trial_number": number, "optuna.state": "RUNNING",
                    "lcp.retry_of": retry_of, "lcp.host": self.host,
                    "lcp.log": str(folder / LOG_NAME)}
            run_id = _safe(lambda: self.tracker.create_run(
                self.mlflow_experiment, f"trial-{number}", tags=tags,
                params={**params, "trial_number": number}))
            if run_id:
                trial.set_user_attr(A_RUN, run_id)
        slot = self.free.pop(0)
        spec = {
            "storage": self.spec.to_dict(), "study": self.study.study_name, "number": number,
            "pruner": self.pruner, "config": cfg.to_dict(), "params": params,
            "tracking_uri": self.tracker.uri if self.tracker is not None else None,
            "run_id": run_id, "threads": slot.threads, "heartbeat_s": HEARTBEAT_S,
        }
        (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2, default=str))
        log_path = folder / LOG_NAME
        log = open(log_path, "a", buffering=1)
        log.write(f"=== trial {number} of study {self.study.study_name} on {slot.label} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        command = [sys.executable, "-m", "pipeline.tune", "run-trial", str(folder / SPEC_NAME)]
        try:
            if self.executor is not None:
                process = self._start_ray_task(command, number, log_path, seeded=cfg.seed >= 0)
            else:
                process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=child_env(slot, seeded=cfg.seed >= 0), cwd=os.getcwd(),
                    start_new_session=True)
        except Exception as exc:  # noqa: BLE001 - OSError here, any Ray error there
            log.close()
            self.free.insert(0, slot)
            reason = f"could not start the trial's process: {exc}"
            trial.set_user_attr(A_REASON, reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self._close_run(run_id, "FAILED", {"failure_reason": reason, "optuna.state": "FAIL"})
            self.echo(f"trial {number} FAILED: {reason}")
            return True
        self.running[number] = Child(number, tid, run_id, process, slot, log_path, log,
                                     time.monotonic(), params)
        self.started += 1
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        again = f" (again, interrupted trial {retry_of})" if retry_of is not None else ""
        self.echo(f"trial {number} started{again}: {shown}  [{slot.label}, log {log_path}]")
        return True

    def _start_ray_task(self, command: list[str], number: int, log_path: Path, *,
                        seeded: bool):
        """The trial's process as a Ray task (1 GPU, or --cpus-per-run CPUs); the node's own
        environment, with the project's settings (`LCP_*`) and none of MLflow's."""
        from pipeline.ray_executor import RayProcess
        from pipeline.scheduler import Job

        project_root = str(Path(__file__).resolve().parent.parent)
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            p for p in (project_root, os.environ.get("PYTHONPATH")) if p)}
        if seeded:
            env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        job = Job(key=f"{self.study.study_name}/trial-{number}", command=command,
                  log_path=log_path, env=env, cwd=os.getcwd())
        return RayProcess(self.executor, job)

    def _reap(self) -> None:
        for number, child in list(self.running.items()):
            rc = child.process.poll()
            if rc is None:
                continue
            del self.running[number]
            child.log.close()
            self.free.append(child.slot)
            self.free.sort(key=lambda s: s.index)
            try:
                self._ended(child, rc)
            except Exception as exc:  # noqa: BLE001 - e.g. the storage is unreachable for now
                self.echo(f"warning: could not record the end of trial {child.number} "
                          f"({type(exc).__name__}: {_first_line(exc)}); if it is left RUNNING, "
                          "the next call enqueues it again")

    def _ended(self, child: Child, rc: int) -> None:
        from optuna.trial import TrialState

        trial = self.storage.get_trial(child.tid)
        elapsed = time.monotonic() - child.started
        if trial.state == TrialState.RUNNING:
            lost = getattr(child.process, "lost", None)
            if lost and not child.stopping:
                # Ray lost the task (its node or worker died): not the trial's fault.
                mark_interrupted(self.study, self.storage, trial, lost, self.tracker)
                self.echo(f"trial {child.number} interrupted ({lost}): enqueued again")
                self._upload_log(child)
                return
            if child.stopping:
                reason = f"stopped by {self.stop_reason or 'the tuner'}"
                mark_interrupted(self.study, self.storage, trial, reason, self.tracker)
                self.echo(f"trial {child.number} interrupted ({reason}): enqueued again for the "
                          "next call")
                self._upload_log(child)
                return
            reason = f"{describe_returncode(rc)}{_log_tail(child.log_path)}"
            _safe(lambda: self.storage.set_trial_user_attr(child.tid, A_REASON, reason))
            _safe(lambda: self.study.tell(child.number, state=TrialState.FAIL,
                                          skip_if_finished=True))
            trial = self.storage.get_trial(child.tid)
        self._reconcile_run(child, trial)
        self._upload_log(child)
        self.echo(describe_trial(trial, elapsed))
        self._update_best()

    def _reconcile_run(self, child: Child, trial) -> None:
        """Make the trial's MLflow run agree with the trial (when its process died first)."""
        if self.tracker is None or not child.run_id:
            return
        run = _safe(lambda: self.tracker.get_run(child.run_id))
        if run is None or run.info.status not in ("RUNNING", "SCHEDULED"):
            return
        status, tags = mlflow_outcome(trial)
        self._close_run(child.run_id, status, tags)

    def _close_run(self, run_id: str | None, status: str, tags: Mapping[str, Any]) -> None:
        if self.tracker is None or not run_id:
            return
        _safe(lambda: self.tracker.set_tags(run_id, dict(tags)))
        _safe(lambda: self.tracker.terminate(run_id, status))

    def _upload_log(self, child: Child) -> None:
        if self.tracker is not None and child.run_id and child.log_path.exists():
            _safe(lambda: self.tracker.log_artifact(child.run_id, child.log_path, "logs"))

    def _best(self):
        try:
            return self.study.best_trial
        except ValueError:
            return None

    def _update_best(self) -> None:
        best = self._best()
        if best is None or self.tracker is None or best.number == self.best_number:
            return
        previous = None
        if self.best_number is not None and self.best_number >= 0:
            try:
                previous = self.study.trials[self.best_number].user_attrs.get(A_RUN)
            except IndexError:
                previous = None
        if previous:
            _safe(lambda: self.tracker.set_tags(previous, {"lcp.best": "false"}))
        run_id = best.user_attrs.get(A_RUN)
        if run_id:
            _safe(lambda: self.tracker.set_tags(run_id, {"lcp.best": "true"}))
        if self.parent_run_id:
            _safe(lambda: self.tracker.set_tags(self.parent_run_id, {
                "lcp.best_trial": best.number, "lcp.best_run_id": run_id,
                "lcp.best_params": json.dumps(best.params)}))
        self.best_number = best.number

    # ------------------------------------------------------------------ stopping
    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            if self.stop_reason is None:
                self.stop_reason = name
                print(f"\n{name}: stopping the running trials (they are enqueued again for the "
                      "next call)...", file=sys.stderr)
            else:
                for child in self.running.values():
                    _signal(child.process, signal.SIGKILL)

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def _restore_signals(self, previous) -> None:
        if previous:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _stop_children(self) -> None:
        for child in self.running.values():
            child.stopping = True
            _signal(child.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.running and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        for child in list(self.running.values()):
            _signal(child.process, signal.SIGKILL)
            child.process.wait()
        self._reap()

    # ------------------------------------------------------------------ the end
    def _finish(self) -> TuneSummary:
        trials = self.study.get_trials(deepcopy=False)
        counts = tally(trials)
        best = self._best()
        self._update_best()
        notes: list[str] = []
        artifacts: list[str] = []
        files = write_study_files(self.study, self.folder, notes)
        if self.tracker is not None and self.parent_run_id:
            metrics = {"trials/complete": counts["complete"], "trials/pruned": counts["pruned"],
                       "trials/failed": counts["failed"], "trials/finished": counts["finished"]}
            if best is not None:
                metrics["best_value"] = best.value
            _safe(lambda: self.tracker.log_metrics(self.parent_run_id, metrics,
                                                   step=counts["finished"]))
            for path in files:
                sub = "plots" if path.suffix == ".png" else None
                if _safe(lambda p=path, s=sub: self.tracker.log_artifact(
                        self.parent_run_id, p, s) or True):
                    artifacts.append(f"{sub}/{path.name}" if sub else path.name)
            status = "KILLED" if self.stop_reason else "FINISHED"
            _safe(lambda: self.tracker.terminate(self.parent_run_id, status))
        return TuneSummary(study=self.study.study_name, storage=self.spec.display(),
                           counts=counts, started=self.started,
                           interrupted_recovered=self.recovered, best=best,
                           parent_run_id=self.parent_run_id, artifacts=artifacts,
                           stopped=self.stop_reason, notes=notes)


def child_env(slot: Slot, seeded: bool = True) -> dict[str, str]:
    """The trial process's environment: nothing that would redirect its MLflow logging."""
    from pipeline.tracking import MLFLOW_RUN_ENV

    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_RUN_ENV}
    project_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if seeded:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    env.update(slot.env())
    return env


def _signal(process, signum: int) -> None:
    if process.poll() is not None:
        return
    if not isinstance(process, subprocess.Popen):  # a Ray task: SIGTERM → cancel, SIGKILL → force
        process.send_signal(signum)
        return
    signal_process_group(process, signum)


def describe_returncode(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"the trial's process was killed by {name}{hint}"
    return f"the trial's process exited with status {rc} without finishing the trial"


def _log_tail(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("===")]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def describe_trial(trial, elapsed: float | None = None) -> str:
    from optuna.trial import TrialState

    took = f" in {elapsed:.0f} s" if elapsed is not None else ""
    reason = trial.user_attrs.get(A_REASON)
    if trial.state == TrialState.COMPLETE:
        return f"trial {trial.number} COMPLETE: validation accuracy {trial.value:.4f}{took}"
    if trial.state == TrialState.PRUNED:
        return f"trial {trial.number} PRUNED{took}: {reason or 'by the pruner'}"
    return f"trial {trial.number} {trial.state.name}{took}: {reason or 'no reason recorded'}"


def mlflow_outcome(trial) -> tuple[str, dict[str, Any]]:
    """(MLflow status, tags) of a finished trial: COMPLETE and pruned → FINISHED; diverged and
    failed → FAILED (with failure_reason)."""
    from optuna.trial import TrialState

    reason = trial.user_attrs.get(A_REASON)
    tags: dict[str, Any] = {"optuna.state": trial.state.name, "lcp.end_reason": reason}
    if trial.state == TrialState.COMPLETE:
        return "FINISHED", tags
    if trial.state == TrialState.PRUNED and not trial.user_attrs.get(A_DIVERGED):
        return "FINISHED", tags
    if trial.state == TrialState.FAIL and trial.user_attrs.get(A_INTERRUPTED):
        return "KILLED", {**tags, "killed_reason": reason}
    return "FAILED", {**tags, "failure_reason": reason}


# ====================================================================== plots and files


def write_study_files(study, folder: Path, notes: list[str]) -> list[Path]:
    """optimization_history.png, param_importances.png (≥ 2 complete trials) and trials.csv."""
    out: list[Path] = []
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = folder / "trials.csv"
        study.trials_dataframe().to_csv(path, index=False)
        out.append(path)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"trials.csv not written: {_first_line(exc)}")
    try:
        path = folder / "optimization_history.png"
        plot_history(study, path)
        out.append(path)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"optimisation history not plotted: {_first_line(exc)}")
    path = folder / "param_importances.png"
    done = importance_plot(study, path, notes)
    if done:
        out.append(path)
    return out


def plot_history(study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    fig, ax = plt.subplots(figsize=(7, 4))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if complete:
        ax.scatter([t.number for t in complete], [t.value for t in complete], s=18,
                   label="complete (final validation accuracy)", color="tab:blue", zorder=3)
        best, xs, ys = -math.inf, [], []
        for t in sorted(complete, key=lambda t: t.number):
            best = max(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned],
                   [t.intermediate_values[max(t.intermediate_values)] for t in pruned], s=18,
                   marker="x", color="tab:gray", label="pruned (last reported)")
    failed = [t for t in study.trials if t.state == TrialState.FAIL or (
        t.state == TrialState.PRUNED and not t.intermediate_values)]
    if failed:
        ax.scatter([t.number for t in failed], [0.0] * len(failed), marker="v", s=18,
                   color="tab:orange", label="failed / diverged")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"Optimisation history: study {study.study_name}")
    ax.grid(alpha=0.3)
    if complete or pruned or failed:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importance_plot(study, path: Path, notes: list[str]) -> bool:
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        notes.append(f"parameter importances skipped: they need ≥ 2 complete trials "
                     f"(the study has {len(complete)})")
        return False
    try:
        import warnings

        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "importances will be equal" on ties
            importances = optuna.importance.get_param_importances(study)
    except Exception as exc:  # noqa: BLE001 - e.g. every trial with the same value
        notes.append(f"parameter importances skipped: {_first_line(exc)}")
        return False
    if not importances:
        notes.append("parameter importances skipped: no parameter varies")
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance for validation accuracy")
    ax.set_title(f"Parameter importances: study {study.study_name} ({len(complete)} complete)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ====================================================================== export


def export_row(manifest_path: str | os.PathLike, plan_exp, study, *,
               suffix: str = EXPORT_SUFFIX, storage: StorageSpec | None = None,
               overrides: Mapping[str, Any] | None = None):
    """Append the best trial's parameters as row `<id>-<suffix>` (derived_from: <id>) to the
    manifest; returns the new row (resolved)."""
    from pipeline.manifest import write_row

    best = _best_or_error(study, plan_exp.id)
    row = plan_exp.derived_row(suffix, dict(best.params))
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    where = f" in {storage.display()}" if storage is not None else ""
    tuning = " ".join(f"--set {k}={v}" for k, v in (overrides or {}).items() if k != "data_dir")
    comment = (f"Tuned by `lcp tune {plan_exp.id}`: study {study.study_name}{where}, best trial "
               f"{best.number} of {len(study.trials)} ({shown}), validation accuracy "
               f"{best.value:.4f} on a held-out split of the training set"
               + (f"; tuning settings: {tuning}" if tuning else "") + ".")
    return write_row(manifest_path, row, comment=comment)


def export_overrides(path: str | os.PathLike, study, exp_id: str) -> Path:
    """The best parameters as `--set key=value` lines (for `lcp run ... $(cat FILE)`)."""
    best = _best_or_error(study, exp_id)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"--set {k}={v}\n" for k, v in best.params.items()))
    return path


def _best_or_error(study, exp_id: str):
    try:
        return study.best_trial
    except ValueError:
        counts = tally(study.get_trials(deepcopy=False))
        raise TuneError(f"study {study.study_name!r} has no complete trial yet ({counts['pruned']}"
                        f" pruned, {counts['failed']} failed): run `lcp tune {exp_id} --trials N` "
                        "first, or widen the search space if every trial diverges") from None


# ====================================================================== the child: one trial


class _Stopped(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


class _Heartbeat:
    """Writes `lcp.heartbeat` to the trial every `interval` seconds while the trial runs."""

    def __init__(self, trial, interval: float):
        self.trial, self.interval = trial, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.trial.set_user_attr(A_HEARTBEAT, time.time())
            except Exception:  # noqa: BLE001 - the next beat tries again
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=60)


class TrialReporter(Callback):
    """The Callback bridge: per-epoch validation accuracy to Optuna (never NaN) and the epoch's
    record to the trial's MLflow run; asks `fit` to stop when the pruner says so."""

    def __init__(self, trial, tracker=None, run_id: str | None = None, pruner: str = "median"):
        self.trial, self.tracker, self.run_id, self.pruner = trial, tracker, run_id, pruner
        self.pruned_at: int | None = None
        self.diverged: str | None = None
        self.last: float | None = None
        self.epochs = 0

    def on_epoch_end(self, state, metrics) -> None:
        epoch = int(metrics.get("epoch", state.epoch))
        self.epochs = epoch
        if self.tracker is not None and self.run_id:
            _safe(lambda: self.tracker.log_metrics(self.run_id, metrics, step=epoch))
        value = metrics.get(OBJECTIVE)
        if value is None:
            return
        loss = metrics.get("eval_val/loss")
        if not math.isfinite(value) or (loss is not None and not math.isfinite(loss)):
            self.diverged = (f"diverged: the validation {'loss' if value == value else 'accuracy'}"
                             f" is not finite at epoch {epoch}")
            state.request_stop(self.diverged)
            return
        self.last = float(value)
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            state.request_stop(f"pruned by the {self.pruner} pruner at epoch {epoch}")


def run_trial(spec_path: str | os.PathLike) -> int:
    """Run one trial in this process (the parent made the trial and its MLflow run)."""
    spec = json.loads(Path(spec_path).read_text())

    def stop(signum, _frame):
        raise _Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    import optuna
    import torch
    from optuna.trial import TrialState

    quiet_optuna()
    torch.set_num_threads(int(spec.get("threads") or 1))
    storage = open_storage(StorageSpec(**spec["storage"]))
    cfg_dict = spec["config"]
    study = optuna.load_study(study_name=spec["study"], storage=storage,
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=make_pruner(spec["pruner"], int(cfg_dict["num_epochs"])))
    number = int(spec["number"])
    tid = trial_id(study, storage, number)
    trial = optuna.Trial(study, tid)
    trial.set_user_attr(A_PID, os.getpid())
    trial.set_user_attr(A_HOST, socket.gethostname())
    trial.set_user_attr(A_HEARTBEAT, time.time())
    tracker = None
    run_id = spec.get("run_id")
    if spec.get("tracking_uri") and run_id:
        from pipeline.tracking import Tracker

        tracker = Tracker(spec["tracking_uri"], check=False)
    print(f"trial {number}: {json.dumps(spec['params'])}", flush=True)
    reporter = TrialReporter(trial, tracker, run_id, spec["pruner"])
    start = time.time()
    state, value, reason, diverged = TrialState.FAIL, None, None, False
    with _Heartbeat(trial, float(spec.get("heartbeat_s") or HEARTBEAT_S)):
        try:
            from lcp.data import build_loaders
            from lcp.training import fit

            from lcp.training import resolve_device

            cfg = RunConfig.from_dict(cfg_dict)
            device = str(resolve_device(cfg))
            slot = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            print(f"trial {number}: device {device} (CUDA_VISIBLE_DEVICES={slot!r}, "
                  f"{torch.get_num_threads()} CPU threads)", flush=True)
            trial.set_user_attr("lcp.device", device)
            if tracker is not None:
                _safe(lambda: tracker.set_tags(run_id, {"lcp.device": device,
                                                        "lcp.cuda_visible_devices": slot}))
            train_loader, eval_loaders, shape, classes = build_loaders(cfg)
            if "val" not in eval_loaders:
                raise TuneError("the trial's config holds out no validation split")
            # Only the validation split is evaluated: never the test set (nor the train set).
            loaders = (train_loader, {"val": eval_loaders["val"]}, shape, classes)
            result = fit(cfg, [reporter], loaders=loaders)
            final = result.final.get(OBJECTIVE)
            if reporter.diverged:
                state, reason, diverged = TrialState.PRUNED, reporter.diverged, True
            elif reporter.pruned_at is not None:
                state = TrialState.PRUNED
                reason = (f"pruned by the {spec['pruner']} pruner at epoch {reporter.pruned_at} "
                          f"(validation accuracy {reporter.last:.4f})")
            elif result.stopped_reason:
                reason = f"stopped: {result.stopped_reason}"
            elif final is None or not math.isfinite(final):
                state, reason, diverged = (TrialState.PRUNED, "diverged: the final validation "
                                           "accuracy is not finite", True)
            else:
                state, value = TrialState.COMPLETE, float(final)
                reason = f"validation accuracy {value:.4f} after {result.epochs_completed} epochs"
        except DivergenceError as exc:
            state, reason, diverged = TrialState.PRUNED, f"diverged: {exc}", True
        except _Stopped as exc:
            print(f"trial {number}: stopped by {exc}; the tuner enqueues it again", flush=True)
            return 143
        except (LcpError, ValueError) as exc:
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
        except Exception as exc:  # noqa: BLE001 - a bug or out of memory: fail, study goes on
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
    duration = time.time() - start
    trial.set_user_attr(A_REASON, reason)
    trial.set_user_attr(A_DURATION, round(duration, 3))
    trial.set_user_attr(A_EPOCHS, reporter.epochs)
    if diverged:
        trial.set_user_attr(A_DIVERGED, True)
    if state == TrialState.COMPLETE:
        frozen = study.tell(trial, value)
    else:
        frozen = study.tell(trial, state=state)
    print(f"trial {number}: {frozen.state.name}: {reason}", flush=True)
    if tracker is not None:
        status, tags = mlflow_outcome(frozen)
        metrics = {"duration_s": duration, "epochs_completed": reporter.epochs}
        if value is not None:
            metrics["objective"] = value
        _safe(lambda: tracker.log_metrics(run_id, metrics, step=reporter.epochs))
        _safe(lambda: tracker.set_tags(run_id, tags))
        _safe(lambda: tracker.terminate(run_id, status))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "run-trial":
        print("usage: python -m pipeline.tune run-trial SPEC.json  (started by `lcp tune`)",
              file=sys.stderr)
        return 2
    try:
        return run_trial(argv[1])
    except _Stopped:
        return 143


if __name__ == "__main__":
    sys.exit(main())
