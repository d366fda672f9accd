"""An Optuna study of `lcp tune`: what it tunes (the plan: a row's config and search space), where
it lives (the storage), how its trials are counted and recovered (docs/tuning.md, "Counting"), its
MLflow parent run, and the export of its best parameters. Running the trials is
`pipeline.tuning.tune`.

    plan = prepare(manifest.get("t1-ff-lcp-di"), overrides={}, params=["k_i", "alpha"])
    spec = resolve_storage(None, tracking_uri)     # a journal file beside the MLflow store
    study = open_study(plan, open_storage(spec), "t1-ff-lcp-di", pruner="median")
    export_row(export_target(manifest), plan.exp, study)   # row t1-ff-lcp-di-tuned
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from lcp.config import NOT_HASHED, RunConfig
from lcp.errors import LcpError, first_line
from pipeline.manifest import schema
from pipeline.tracking.run_status import end_if_open

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
EXPORT_SUFFIX = "tuned"

# Trial user attributes
A_HOST, A_PID, A_HEARTBEAT = "lcp.host", "lcp.pid", "lcp.heartbeat"
A_RUN, A_REASON, A_DURATION = "lcp.mlflow_run_id", "lcp.end_reason", "lcp.duration_s"
A_DIVERGED, A_INTERRUPTED, A_SURPLUS = "lcp.diverged", "lcp.interrupted", "lcp.surplus"
A_RETRY_OF, A_EPOCHS, A_BASELINE = "lcp.retry_of", "lcp.epochs", "lcp.baseline"
# Study user attributes
S_ID, S_CONFIG, S_SPACE = "lcp.id", "lcp.base_config", "lcp.search_space"
S_PARENT_RUN, S_TRACKING = "lcp.mlflow_parent_run_id", "lcp.tracking_uri"

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
    try:
        return schema.parse_space_option(text)
    except schema.SchemaError as exc:
        raise TuneError(f"--space {text!r}: {exc.reason}") from None


def check_space(space: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any],
                exp_id: str) -> dict[str, dict[str, Any]]:
    """The space, validated for the row's config `base` (TuneError naming the parameter)."""
    try:
        return schema.check_space(space, base)
    except schema.SchemaError as exc:
        raise TuneError(f"search range for {exc.loc[0]} ({exp_id}): {exc.reason}") from None


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


def baseline_values(plan: TunePlan) -> dict[str, Any]:
    """The row's own values of the tuned parameters: the setting a study sets out to improve,
    run as one of its trials with --baseline. TuneError when one lies outside the search space
    (the study could never sample it)."""
    values = {name: getattr(plan.base, name) for name in plan.space}
    for name, dist in distributions(plan.space).items():
        value = values[name]
        inside = (value in dist.choices if hasattr(dist, "choices")
                  else dist.low <= value <= dist.high)
        if not inside:
            raise TuneError(f"--baseline: {plan.exp.id}'s {name} = {value} is outside the "
                            f"search space ({describe_space({name: plan.space[name]})}); widen "
                            f"it with --space {name}=LOW:HIGH or leave --baseline out")
    return values


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

    exp: Any  # pipeline.manifest.manifest.Experiment
    base: RunConfig  # the row's first seed, the tuning defaults, --set
    space: dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)  # --set (and --data-dir) as given
    warnings: list[str] = field(default_factory=list)

    @property
    def identity(self) -> dict[str, Any]:
        """The settings a study is tied to (what trials compute), without the searched ones."""
        return {k: v for k, v in self.base.to_dict().items()
                if k not in self.space and k not in NOT_HASHED}

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
    space = check_space(space, base.to_dict(), exp.id)
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
    from pipeline.tracking.store import sqlite_path

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
            raise StorageError(f"cannot read the journal file {path}: {first_line(exc)}; give "
                               "another --storage PATH") from None
    url = spec.target
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    engine_kwargs: dict[str, Any] = {}
    if scheme in ("postgresql", "postgres", "mysql", "mariadb"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}
    elif scheme == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
    from pipeline.tracking.store import first_open_lock, is_created_meanwhile_error, with_retry

    try:
        with first_open_lock(url):  # one process at a time creates a SQLite storage's tables
            # on a database server two tuners starting together can both create the tables
            storage = with_retry(
                lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs),
                attempts=6, retry_on=is_created_meanwhile_error)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or first_line(exc)
        hint = ("pip install -e \".[postgres]\" (psycopg2-binary and psycopg: SQLAlchemy "
                "2.1 opens postgresql:// with psycopg)"
                if scheme.startswith("postgres") else "install the database driver for "
                f"{scheme!r} (see SQLAlchemy's dialect documentation)")
        raise StorageError(f"cannot open the Optuna storage {mask_url(url)}: its database driver "
                           f"is not installed ({missing}); {hint}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy errors (refused, auth, unknown db)
        raise StorageError(
            f"cannot open the Optuna storage {mask_url(url)}: {first_line(exc)}. Check the URL "
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
    # constant_liar: trials running at once are not all asked for the same point
    kwargs = dict(storage=storage, study_name=name,
                  sampler=optuna.samplers.TPESampler(constant_liar=True),
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
        # Two tuners may start one study at once, and Optuna writes one attribute at a time: the
        # settings go last, as the mark that the study is complete, and both then check what the
        # storage holds, so a tuner with other settings is refused instead of mixing two studies.
        study.set_user_attr(S_ID, plan.exp.id)
        study.set_user_attr(S_SPACE, space)
        study.set_user_attr(S_CONFIG, identity)
        attrs = study.user_attrs  # read from the storage again
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
        raise TuneError(f"study {name!r} searches another space "
                        f"({describe_space(attrs.get(S_SPACE) or {})})"
                        f", not {describe_space(plan.space)}; give the same --params/--space as "
                        "before, or start a new study with --study NAME")
    return study


def counts_toward_total(trial) -> bool:
    """COMPLETE, PRUNED (diverged included), RUNNING and WAITING trials count toward --trials;
    FAILED ones never do (a crash such as a missing dataset, an interrupted or a surplus trial):
    once the cause is fixed, the same command runs them."""
    from optuna.trial import TrialState

    return trial.state != TrialState.FAIL


def is_failure(trial) -> bool:
    """A FAILED trial that really failed (not interrupted and enqueued again, not surplus)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and not (trial.user_attrs.get(A_INTERRUPTED)
                                                   or trial.user_attrs.get(A_SURPLUS))


def tally(trials) -> dict[str, int]:
    """How many trials are in each state. `counted` (toward --trials) = `finished` (complete +
    pruned) + running + waiting; `failed` (real failures) and `interrupted` are not counted."""
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
            if is_failure(t):
                out["failed"] += 1
            elif t.user_attrs.get(A_INTERRUPTED):
                out["interrupted"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    out["finished"] = out["complete"] + out["pruned"]
    out["counted"] = out["finished"] + out["running"] + out["waiting"]
    return out


def trial_id(study, storage, number: int) -> int:
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def stale_reason(trial, now: float | None = None, host: str | None = None,
                 stale_after: float = STALE_AFTER_S) -> str | None:
    """Why a RUNNING trial is abandoned (its process is gone or silent), None if it is alive."""
    from pipeline.runs.rundir import pid_alive

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
    study.enqueue_trial(dict(trial.params), user_attrs={
        A_RETRY_OF: trial.number, **({A_BASELINE: True} if trial.user_attrs.get(A_BASELINE)
                                     else {})})
    run_id = trial.user_attrs.get(A_RUN)
    if tracker is not None and run_id:
        best_effort(lambda: end_if_open(tracker, run_id, "KILLED", {
            "optuna.state": "FAIL", "lcp.interrupted": "true", "killed_reason": reason}))
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
        best_effort(lambda: tracker.call(lambda: tracker.client.delete_run(mine)))
    return winner


def best_effort(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop the study
        print(f"warning: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return None


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def safe_name(name: str) -> str:
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


# ====================================================================== export


def export_target(manifest) -> Path:
    """The file `--export` writes: the manifest that was read (`manifest.path`: the path given,
    or the copy packaged in `pipeline/` when ./experiments.yaml is absent), links resolved.
    TuneError (one line: copy it and pass --manifest FILE) when it cannot be written: a copy
    installed inside site-packages, or no write permission on it or its folder."""
    path = Path(os.path.realpath(manifest.path))
    packaged = any(part in ("site-packages", "dist-packages") for part in path.parts)
    if packaged:
        raise TuneError(f"--export would write {path}, the copy of the manifest installed with "
                        f"the package; copy it (cp {shlex.quote(str(path))} experiments.yaml) "
                        "and pass --manifest experiments.yaml (to lcp run and lcp report too)")
    if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        raise TuneError(f"--export cannot write {path} (not writable); copy it to a writable "
                        "FILE and pass --manifest FILE")
    return path


def export_row(manifest_path: str | os.PathLike, plan_exp, study, *,
               suffix: str = EXPORT_SUFFIX, storage: StorageSpec | None = None,
               overrides: Mapping[str, Any] | None = None):
    """Append the best trial's parameters as row `<id>-<suffix>` (derived_from: <id>) to the
    manifest at `manifest_path` (`export_target(manifest)`: the file that was read); returns the
    new row (resolved)."""
    from pipeline.manifest.manifest import write_row

    best = _best_or_error(study, plan_exp.id)
    row = plan_exp.derived_row(suffix, dict(best.params))
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
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


def best_trial(study):
    """The study's best complete trial, None while it has none."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _best_or_error(study, exp_id: str):
    best = best_trial(study)
    if best is None:
        counts = tally(study.get_trials(deepcopy=False))
        raise TuneError(f"study {study.study_name!r} has no complete trial yet ({counts['pruned']}"
                        f" pruned, {counts['failed']} failed): run the same `lcp tune {exp_id}` "
                        "command with --trials N in place of --export first (the same --study, "
                        "--storage and --set), or widen the search space if every trial "
                        "diverges")
    return best
