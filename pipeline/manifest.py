"""The experiment manifest: every run of the paper's Tables 1 and 2, read from experiments.yaml.

A row of the manifest is one result cell of the paper: an id of the form
``t{table}-{model}-{trainer}`` (``t1-ff-lcp-di``, ``t2-conv-rnn-rbp``; a derived row such as a
tuned one adds ``-suffix`` and names its origin in ``derived_from``), the table, the section, the
paper's label, the run's flags (``args``, the paper's command line), the seeds and an optional
Optuna search space. `load_manifest` reads and validates the whole file and reports the first
problem as one `ManifestError` that names the file (and line), the row and the field.

    manifest = load_manifest()
    exp = manifest.get("t1-ff-lcp-di")
    cfg = exp.config(seed=0, overrides=parse_overrides(["num_epochs=1"]))
    manifest.baseline(exp).id            # 't1-ff-bp'

`write_row` appends a row (e.g. `Experiment.derived_row("tuned", best_params)`) to the end of the
file as text, leaving the rest of the file as it is, and checks the result by reloading it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from lcp.config import MODELS, TRAINERS, ConfigError, RunConfig
from lcp.errors import LcpError

__all__ = [
    "BASELINE_LABELS",
    "DEFAULT_PATH",
    "DEFAULT_SEEDS",
    "LABELS",
    "SECTIONS",
    "TABLES",
    "Experiment",
    "Manifest",
    "ManifestError",
    "load_manifest",
    "parse_id",
    "parse_overrides",
    "write_row",
]

DEFAULT_PATH = "experiments.yaml"
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
TABLES: tuple[int, ...] = (1, 2)
# section -> (table, model)
SECTIONS: dict[str, tuple[int, str]] = {
    "MNIST FF": (1, "ff"),
    "MNIST RNN": (1, "rnn"),
    "CIFAR-10 FF": (2, "conv-ff"),
    "CIFAR-10 RNN": (2, "conv-rnn"),
}
# trainer -> the paper's column label
LABELS: dict[str, str] = {
    "bp": "BP",
    "rbp": "RBP",
    "lcp-ebd": "LCP-EBD",
    "lcp-di": "LCP-DI",
    "lcp-kp": "LCP-DI (KP)",
    "lcp-lf": "LCP-LF",
}
BASELINE_LABELS: tuple[str, ...] = ("BP", "RBP")

TOP_LEVEL_KEYS = ("defaults", "sections", "experiments")
DEFAULTS_KEYS = ("seeds", "search")
SECTION_KEYS = ("args", "search")
ROW_REQUIRED = ("id", "table", "section", "label", "args")
ROW_OPTIONAL = ("seeds", "search", "derived_from", "paper")
ROW_KEYS = ROW_REQUIRED + ROW_OPTIONAL
SEARCH_TYPES = ("float", "int", "categorical")
SEARCH_KEYS = ("type", "low", "high", "log", "choices")
# What makes a row that row: not in a row's args (seed), search spaces or config overrides.
IDENTITY_FIELDS = ("seed", "model", "trainer")

_SUFFIX = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"
_SUFFIX_RE = re.compile(rf"^{_SUFFIX}$")


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


ID_RE = re.compile(
    rf"^t(?P<table>[0-9]+)-(?P<model>{_alternatives(MODELS)})"
    rf"-(?P<trainer>{_alternatives(TRAINERS)})(?:-(?P<suffix>{_SUFFIX}))?$"
)

_FIELD_KINDS: dict[str, str] = {f.name: str(f.type) for f in fields(RunConfig)}


class ManifestError(LcpError):
    """experiments.yaml (or a row, an override or an id given for it) is not valid."""


def parse_id(experiment_id: str) -> tuple[int, str, str, str | None]:
    """'t1-ff-lcp-di-tuned' -> (1, 'ff', 'lcp-di', 'tuned'); the suffix is None on paper rows."""
    match = ID_RE.match(experiment_id) if isinstance(experiment_id, str) else None
    if match is None:
        raise ManifestError(
            f"{experiment_id!r} is not an experiment id of the form "
            "t{table}-{model}-{trainer}"
            f"[-suffix] (models: {', '.join(MODELS)}; trainers: {', '.join(TRAINERS)})"
        )
    return (int(match["table"]), match["model"], match["trainer"], match["suffix"])


# ====================================================================== the rows


@dataclass
class Experiment:
    """One row of the manifest, resolved (section args merged in, defaults applied)."""

    id: str
    table: int
    section: str
    label: str
    args: dict[str, Any]  # the run's flags, typed as RunConfig types them (no `seed`)
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    search: dict[str, dict[str, Any]] = field(default_factory=dict)
    derived_from: str | None = None
    paper: float | None = None  # the paper's test accuracy (%) for this row, when given

    @property
    def model(self) -> str:
        return self.args["model"]

    @property
    def trainer(self) -> str:
        return self.args["trainer"]

    def config(self, seed: int, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """The run's RunConfig: the row's args, `seed`, then `overrides` (e.g. from --set)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ManifestError(
                f"experiment {self.id}: seed must be an integer ≥ 0 (got {seed!r})"
            )
        overrides = dict(overrides or {})
        fixed = [k for k in IDENTITY_FIELDS if k in overrides]
        if fixed:
            raise ManifestError(
                f"experiment {self.id}: {', '.join(fixed)} cannot be overridden (they define the "
                "experiment; the seed comes from the experiment's seeds or the seed argument)"
            )
        try:
            return RunConfig.from_dict({**self.args, "seed": seed, **overrides})
        except ConfigError as exc:
            raise ManifestError(f"experiment {self.id}: {exc}") from None

    def configs(self, overrides: Mapping[str, Any] | None = None) -> list[RunConfig]:
        """One RunConfig per seed of the row."""
        return [self.config(seed, overrides) for seed in self.seeds]

    def derived_row(
        self,
        suffix: str,
        overrides: Mapping[str, Any] | None = None,
        *,
        label: str | None = None,
        seeds: Iterable[int] | None = None,
        search: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A new row (for `write_row`): this row's args with `overrides`, id `<id>-<suffix>`."""
        if not isinstance(suffix, str) or not _SUFFIX_RE.match(suffix):
            raise ManifestError(
                f"suffix {suffix!r} is not valid: use lower-case letters and digits, "
                "separated by '-', '_' or '.' (e.g. 'tuned')"
            )
        overrides = dict(overrides or {})
        seeds = list(self.seeds if seeds is None else seeds)
        cfg = self.config(seeds[0] if seeds else 0, overrides)
        keys = list(self.args) + [k for k in overrides if k not in self.args]
        row: dict[str, Any] = {
            "id": f"{self.id}-{suffix}",
            "table": self.table,
            "section": self.section,
            "label": label if label is not None else f"{self.label} ({suffix})",
            "derived_from": self.id,
            "seeds": seeds,
            "args": {k: getattr(cfg, k) for k in keys},
        }
        if search:
            row["search"] = dict(search)
        return row


@dataclass
class Manifest:
    """All rows of experiments.yaml, in file order."""

    path: Path
    experiments: list[Experiment]

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self.experiments)

    def __len__(self) -> int:
        return len(self.experiments)

    def __contains__(self, experiment_id: object) -> bool:
        return any(e.id == experiment_id for e in self.experiments)

    def ids(self) -> list[str]:
        return [e.id for e in self.experiments]

    def get(self, experiment_id: str) -> Experiment:
        for exp in self.experiments:
            if exp.id == experiment_id:
                return exp
        raise ManifestError(
            f"no experiment {experiment_id!r} in {self.path}; valid ids are: "
            + ", ".join(self.ids())
        )

    def tables(self) -> list[int]:
        return sorted({e.table for e in self.experiments})

    def table(self, n: int | str) -> list[Experiment]:
        """The rows of table `n`, in file order."""
        number = _table_number(n)
        rows = [e for e in self.experiments if e.table == number]
        if not rows:
            raise ManifestError(
                f"no table {n!r} in {self.path}; tables are: "
                + ", ".join(str(t) for t in self.tables())
            )
        return rows

    def sections(self, table: int | str) -> list[str]:
        """The sections of table `table`, in file order."""
        out: list[str] = []
        for exp in self.table(table):
            if exp.section not in out:
                out.append(exp.section)
        return out

    def baseline(self, exp: Experiment | str) -> Experiment | None:
        """The BP/RBP row of `exp`'s table and section (the row itself for a baseline row)."""
        if isinstance(exp, str):
            exp = self.get(exp)
        for row in self.experiments:
            if (
                row.table == exp.table
                and row.section == exp.section
                and row.label in BASELINE_LABELS
                and row.derived_from is None
            ):
                return row
        return None


def _table_number(n: int | str) -> int | None:
    if isinstance(n, bool):
        return None
    if isinstance(n, int):
        return n
    if isinstance(n, str) and n.strip().isdigit():
        return int(n.strip())
    return None


# ====================================================================== overrides


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """['num_epochs=1', 'device=cpu'] (from --set) -> {'num_epochs': '1', 'device': 'cpu'}.

    Keys must be RunConfig fields ('-' may stand for '_'); values stay text (RunConfig coerces).
    """
    valid = RunConfig.field_names()
    out: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ManifestError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            key = key.replace("-", "_")
        if key not in valid:
            raise ManifestError(
                f"--set {item!r}: unknown setting {key!r}; valid settings are: " + ", ".join(valid)
            )
        if key in out:
            raise ManifestError(f"--set {key} is given twice")
        out[key] = value
    return out


# ====================================================================== loading


def load_manifest(path: str | os.PathLike[str] = DEFAULT_PATH) -> Manifest:
    """Read and validate the manifest (the first problem is raised as one ManifestError)."""
    resolved = _resolve_path(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    return _Loader(str(path), text).load(resolved)


def _resolve_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists() and str(path) == DEFAULT_PATH:
        # Not run from the repository root: the package's copy (a link to the repository's
        # experiments.yaml in a checkout, the file itself in an installed package).
        repo_copy = Path(__file__).resolve().parent / DEFAULT_PATH
        if repo_copy.exists():
            return repo_copy
    if not p.exists():
        raise ManifestError(f"{path}: manifest file not found (working directory {os.getcwd()})")
    return p


def _node_lines(node: yaml.Node, path: tuple = (), out: dict | None = None,
                dupes: list | None = None, stack: tuple = ()) -> tuple[dict, list]:
    """Line (1-based) of every key/item path of a composed YAML tree; duplicate keys found."""
    out = {} if out is None else out
    dupes = [] if dupes is None else dupes
    if id(node) in stack:  # a recursive alias
        return out, dupes
    stack = stack + (id(node),)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None:
                if key in seen and key != "<<":
                    dupes.append((path + (key,), line, seen[key]))
                seen.setdefault(key, line)
                out.setdefault(path + (key,), line)
                _node_lines(value_node, path + (key,), out, dupes, stack)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(path + (i,), item.start_mark.line + 1)
            _node_lines(item, path + (i,), out, dupes, stack)
    return out, dupes


class _Loader:
    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.lines: dict[tuple, int] = {}
        self.rows: list[Any] = []

    # ------------------------------------------------------------------ errors
    def error(self, where: tuple, message: str, line_at: tuple | None = None) -> ManifestError:
        """One error: file:line, the row (or block) and field `where`; the line of `line_at`."""
        line = None
        at = where if line_at is None else line_at
        for n in range(len(at), 0, -1):
            if at[:n] in self.lines:
                line = self.lines[at[:n]]
                break
        location = f"{self.name}:{line}" if line else self.name
        return ManifestError(f"{location}: {self.describe(where)}: {message}")

    def describe(self, where: tuple) -> str:
        if not where:
            return "top level"
        head, rest = where[0], where[1:]
        if head == "experiments" and rest and isinstance(rest[0], int):
            index = rest[0]
            row = self.rows[index] if index < len(self.rows) else None
            row_id = row.get("id") if isinstance(row, dict) else None
            what = f"experiment row {index + 1}"
            if isinstance(row_id, str):
                what += f" (id {row_id})"
            return what + _field(rest[1:])
        if head == "sections" and rest:
            return f"section {rest[0]!r}" + _field(rest[1:])
        if head == "defaults":
            return "defaults" + _field(rest)
        return f"top-level key {head!r}" + _field(rest)

    # ------------------------------------------------------------------ the file
    def load(self, resolved: Path) -> Manifest:
        try:
            data = yaml.safe_load(self.text)
            root = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            if mark is not None:
                line, column = mark.line + 1, mark.column + 1
                raise ManifestError(
                    f"{self.name}:{line}: not valid YAML (line {line}, column {column}): "
                    f"{exc.problem or exc.context}"
                ) from None
            raise ManifestError(f"{self.name}: not valid YAML: {exc}") from None
        except yaml.YAMLError as exc:
            raise ManifestError(f"{self.name}: not valid YAML: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("experiments"), list):
            self.rows = data["experiments"]
        if root is not None:
            self.lines, dupes = _node_lines(root)
            if dupes:
                where, line, first = dupes[0]
                raise self.error(where, f"key {where[-1]!r} is given twice (first on line {first})")

        if not isinstance(data, dict):
            raise self.error((), "expected a mapping with keys " + ", ".join(TOP_LEVEL_KEYS)
                             + f" (got {_kind(data)})")
        self.check_keys((), data, TOP_LEVEL_KEYS, required=("experiments",))

        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise self.error(("defaults",), f"expected a mapping (got {_kind(defaults)})")
        self.check_keys(("defaults",), defaults, DEFAULTS_KEYS)
        default_seeds = (
            self.check_seeds(("defaults", "seeds"), defaults["seeds"])
            if "seeds" in defaults else list(DEFAULT_SEEDS)
        )
        default_search = self.check_search(("defaults", "search"), defaults.get("search"))

        sections = data.get("sections") or {}
        if not isinstance(sections, dict):
            raise self.error(("sections",), f"expected a mapping (got {_kind(sections)})")
        for name, body in sections.items():
            where = ("sections", name)
            if name not in SECTIONS:
                raise self.error(where, f"unknown section {name!r}; sections are: "
                                 + ", ".join(SECTIONS))
            if not isinstance(body, dict):
                raise self.error(where, f"expected a mapping (got {_kind(body)})")
            self.check_keys(where, body, SECTION_KEYS)
            self.check_args(where + ("args",), body.get("args", {}))
            self.check_search(where + ("search",), body.get("search"), allow_null=True)

        rows = data["experiments"]
        if not isinstance(rows, list) or not rows:
            raise self.error(("experiments",), "expected a non-empty list of rows "
                             f"(got {_kind(rows)})")
        experiments: list[Experiment] = []
        seen: dict[str, int] = {}
        for index, row in enumerate(rows):
            exp = self.load_row(index, row, sections, default_seeds, default_search)
            if exp.id in seen:
                raise self.error(("experiments", index, "id"),
                                 f"id {exp.id!r} is already used by row {seen[exp.id] + 1}")
            seen[exp.id] = index
            experiments.append(exp)
        by_id = {e.id: e for e in experiments}
        for index, exp in enumerate(experiments):
            if exp.derived_from is None:
                continue
            where = ("experiments", index, "derived_from")
            origin = by_id.get(exp.derived_from)
            if origin is None or origin is exp:
                raise self.error(where, f"{exp.derived_from!r} is not another row's id; ids are: "
                                 + ", ".join(e.id for e in experiments if e is not exp))
            if (origin.table, origin.section) != (exp.table, exp.section):
                raise self.error(where, f"row {origin.id} is in table {origin.table}, "
                                 f"{origin.section}; a derived row stays in its origin's section")
        return Manifest(path=resolved, experiments=experiments)

    # ------------------------------------------------------------------ one row
    def load_row(self, index: int, row: Any, sections: dict, default_seeds: list[int],
                 default_search: dict) -> Experiment:
        where = ("experiments", index)
        if not isinstance(row, dict):
            raise self.error(where, f"expected a mapping with keys {', '.join(ROW_REQUIRED)} "
                             f"(got {_kind(row)})")
        self.check_keys(where, row, ROW_KEYS, required=ROW_REQUIRED)
        row_id, table, section, label = row["id"], row["table"], row["section"], row["label"]
        if not isinstance(row_id, str):
            raise self.error(where + ("id",), f"expected text (got {_kind(row_id)})")
        if isinstance(table, bool) or table not in TABLES:
            raise self.error(where + ("table",), f"table must be one of "
                             f"{', '.join(map(str, TABLES))} (got {table!r})")
        if not isinstance(section, str) or section not in SECTIONS:
            raise self.error(where + ("section",), f"section {section!r} is not valid; sections "
                             "are: " + ", ".join(SECTIONS))
        sec_table, sec_model = SECTIONS[section]
        if sec_table != table:
            raise self.error(where + ("section",), f"section {section!r} is in table {sec_table}, "
                             f"not table {table}")
        valid_labels = list(LABELS.values())
        if not isinstance(label, str) or not any(
            label == v or label.startswith(v + " ") for v in valid_labels
        ):
            raise self.error(where + ("label",), f"label {label!r} is not valid; labels are: "
                             + ", ".join(valid_labels))

        # args: the section's shared flags, then the row's own
        row_args = row["args"]
        self.check_args(where + ("args",), row_args)
        shared = (sections.get(section) or {}).get("args") or {}
        merged = {**shared, **row_args}
        seeds = (self.check_seeds(where + ("seeds",), row["seeds"])
                 if "seeds" in row else list(default_seeds))
        try:
            cfg = RunConfig.from_dict({**merged, "seed": seeds[0]})
        except ConfigError as exc:
            name = _setting_named(str(exc))
            if name is not None and name not in row_args and name in shared:
                raise self.error(where + ("args", name),
                                 f"(from sections[{section!r}].args) {exc}",
                                 line_at=("sections", section, "args", name)) from None
            raise self.error(where + (("args", name) if name else ("args",)), str(exc)) from None
        args = {k: getattr(cfg, k) for k in merged}
        model, trainer = cfg.model, cfg.trainer

        if sec_model != model:
            raise self.error(where + ("section",), f"section {section!r} holds model "
                             f"{sec_model!r} runs, but args give model {model!r}")

        expected = f"t{table}-{model}-{trainer}"
        derived_from = row.get("derived_from")
        if row_id == expected:
            if derived_from is not None:
                raise self.error(where + ("derived_from",), "only a derived row (id "
                                 f"{expected}-<suffix>) names derived_from; this row's id "
                                 "has no suffix")
        elif row_id.startswith(expected + "-") and _SUFFIX_RE.match(row_id[len(expected) + 1:]):
            if derived_from is None:
                raise self.error(where + ("derived_from",), f"row {row_id} has a suffix after "
                                 f"{expected}, so it must name the row it derives from "
                                 "(derived_from: <id>)")
            if not isinstance(derived_from, str):
                raise self.error(where + ("derived_from",),
                                 f"expected an id (got {_kind(derived_from)})")
        else:
            raise self.error(where + ("id",), f"id {row_id!r} does not match the row: expected "
                             f"{expected!r} (t{{table}}-{{model}}-{{trainer}} from table {table},"
                             f" model {model}, trainer {trainer}; a derived row may add -suffix)")

        paper_label = LABELS[trainer]
        label_ok = label == paper_label or (
            derived_from is not None
            and label.startswith(paper_label + " ")
            and label not in LABELS.values()
        )
        if not label_ok:
            raise self.error(where + ("label",), f"label {label!r} does not match trainer "
                             f"{trainer!r}: the paper's label is {paper_label!r}"
                             + (" (a derived row may add text after it)"
                                if derived_from is not None else ""))

        # search: defaults, then the section's, then the row's (null drops an entry)
        search: dict[str, dict[str, Any]] = dict(default_search)
        origin: dict[str, tuple] = {p: ("defaults", "search", p) for p in search}
        for source, spec in (
            (("sections", section, "search"), (sections.get(section) or {}).get("search")),
            (where + ("search",), row.get("search")),
        ):
            for param, entry in self.check_search(source, spec, allow_null=True).items():
                if entry is None:
                    search.pop(param, None)
                    origin.pop(param, None)
                else:
                    search[param] = entry
                    origin[param] = source + (param,)
        for param, entry in search.items():
            values = entry["choices"] if entry["type"] == "categorical" else [entry["low"],
                                                                             entry["high"]]
            for value in values:
                try:
                    RunConfig.from_dict({**args, "seed": seeds[0], param: value})
                except ConfigError as exc:
                    src = origin[param]
                    note = "" if src[0] == "experiments" else f" (from {'.'.join(map(str, src))})"
                    raise self.error(where + ("search", param),
                                     f"value {value!r} is not a valid {param}{note}: {exc}",
                                     line_at=src) from None

        paper = row.get("paper")
        if paper is not None and (isinstance(paper, bool) or not isinstance(paper, (int, float))
                                  or not 0 <= paper <= 100):
            raise self.error(where + ("paper",), "expected the paper's test accuracy in % "
                             f"(a number from 0 to 100; got {paper!r})")
        return Experiment(id=row_id, table=table, section=section, label=label, args=args,
                          seeds=seeds, search=search, derived_from=derived_from,
                          paper=None if paper is None else float(paper))

    # ------------------------------------------------------------------ pieces
    def check_keys(self, where: tuple, mapping: dict, valid: tuple[str, ...],
                   required: tuple[str, ...] = ()) -> None:
        for key in mapping:
            if key not in valid:
                raise self.error(where + (key,), f"unknown key {key!r}; valid keys are: "
                                 + ", ".join(valid))
        for key in required:
            if key not in mapping:
                raise self.error(where + (key,), f"required key {key!r} is missing")

    def check_args(self, where: tuple, args: Any) -> None:
        if not isinstance(args, dict):
            raise self.error(where, f"expected a mapping of flag: value (got {_kind(args)})")
        valid = RunConfig.field_names()
        for name, value in args.items():
            if name == "seed":
                raise self.error(where + (name,), "the seed is not a flag of the row: list the "
                                 "row's seeds under `seeds`")
            if name not in valid:
                raise self.error(where + (name,), f"unknown flag {name!r}; valid flags (RunConfig "
                                 "fields) are: " + ", ".join(n for n in valid if n != "seed"))
            if value is None or isinstance(value, (dict, list)):
                raise self.error(where + (name,), f"expected a single value (got {_kind(value)})")

    def check_seeds(self, where: tuple, seeds: Any) -> list[int]:
        if not isinstance(seeds, list) or not seeds:
            raise self.error(where, f"expected a non-empty list of integers ≥ 0 "
                             f"(got {_kind(seeds)})")
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise self.error(where, f"seeds must be integers ≥ 0 (got {seed!r})")
        if len(set(seeds)) != len(seeds):
            raise self.error(where, f"seeds repeat: {seeds}")
        return list(seeds)

    def check_search(self, where: tuple, spec: Any, allow_null: bool = False) -> dict:
        """A validated search space: {type, low, high, log} or {type, choices} per parameter."""
        if spec is None:
            return {}
        if not isinstance(spec, dict):
            raise self.error(where, "expected a mapping of parameter: {type, low, high, log} or "
                             f"{{type: categorical, choices}} (got {_kind(spec)})")
        out: dict[str, Any] = {}
        for param, entry in spec.items():
            at = where + (param,)
            if param not in _FIELD_KINDS:
                raise self.error(at, f"unknown parameter {param!r}: a search parameter must be a "
                                 "RunConfig field; fields are: "
                                 + ", ".join(n for n in _FIELD_KINDS if n not in IDENTITY_FIELDS))
            if param in IDENTITY_FIELDS:
                raise self.error(at, f"{param!r} cannot be searched: it defines the experiment")
            if entry is None and allow_null:
                out[param] = None
                continue
            if not isinstance(entry, dict):
                raise self.error(at, f"expected a mapping with keys {', '.join(SEARCH_KEYS)} "
                                 f"(got {_kind(entry)})")
            for key in entry:
                if key not in SEARCH_KEYS:
                    raise self.error(at + (key,), f"unknown key {key!r}; valid keys are: "
                                     + ", ".join(SEARCH_KEYS))
            kind = entry.get("type")
            if kind not in SEARCH_TYPES:
                raise self.error(at + ("type",), f"type must be one of {', '.join(SEARCH_TYPES)}"
                                 f" (got {kind!r})")
            field_kind = _FIELD_KINDS[param]
            if kind == "categorical":
                for key in ("low", "high", "log"):
                    if key in entry:
                        raise self.error(at + (key,), f"a categorical entry takes `choices`, "
                                         f"not {key!r}")
                choices = entry.get("choices")
                if not isinstance(choices, list) or not choices:
                    raise self.error(at + ("choices",), "expected a non-empty list of values "
                                     f"(got {_kind(choices)})")
                for choice in choices:
                    if isinstance(choice, (dict, list)) or choice is None:
                        raise self.error(at + ("choices",), f"choices must be single values "
                                         f"(got {choice!r})")
                if len({repr(c) for c in choices}) != len(choices):
                    raise self.error(at + ("choices",), f"choices repeat: {choices}")
                out[param] = {"type": "categorical", "choices": list(choices)}
                continue
            if "choices" in entry:
                raise self.error(at + ("choices",), f"a {kind} entry takes low/high, not choices")
            if field_kind not in ("int", "float") or (kind == "float" and field_kind == "int"):
                hint = "type: int" if field_kind == "int" else "type: categorical"
                raise self.error(at + ("type",), f"{param} takes {field_kind} values: a {kind} "
                                 f"range does not fit it (use {hint})")
            bounds = {}
            for key in ("low", "high"):
                if key not in entry:
                    raise self.error(at + (key,), f"a {kind} entry needs {key!r}")
                bounds[key] = _number(entry[key], kind)
                if bounds[key] is None:
                    wanted = "an integer" if kind == "int" else "a number"
                    raise self.error(at + (key,), f"expected {wanted} (got {entry[key]!r})")
            low, high = bounds["low"], bounds["high"]
            if not low < high:
                raise self.error(at + ("low",), f"low must be < high (got low={low}, high={high})")
            log = entry.get("log", False)
            if not isinstance(log, bool):
                raise self.error(at + ("log",), f"expected true or false (got {log!r})")
            if log and not low > 0:
                raise self.error(at + ("log",), f"a log-scale range needs low > 0 (got low={low})")
            out[param] = {"type": kind, "low": low, "high": high, "log": log}
        return out


def _field(rest: tuple) -> str:
    if not rest:
        return ""
    text = ""
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return f", field '{text}'"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _number(value: Any, kind: str) -> int | float | None:
    if isinstance(value, bool):
        return None
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _setting_named(message: str) -> str | None:
    """The RunConfig field a ConfigError message is about (None when it names none)."""
    match = re.search(r"setting '(\w+)'", message)
    if match:
        return match.group(1)
    if "does not run on model" in message:
        return "trainer"
    if "--data=" in message:
        return "data"
    for word in re.findall(r"'(\w+)'", message):
        if word in _FIELD_KINDS:
            return word
    return None


# ====================================================================== appending a row


def write_row(path: str | os.PathLike[str], row: Mapping[str, Any], *,
              comment: str | None = None) -> Experiment:
    """Append `row` (a mapping as written in the YAML) to the manifest at `path`.

    The row's text is appended to the end of the file (the `experiments:` list must be the file's
    last block); nothing else in the file changes. The file is then reloaded: if the row makes it
    invalid, the file is cut back to what it was and the ManifestError is raised.
    Returns the new row, resolved.
    """
    path = Path(path)
    if not isinstance(row, Mapping):
        raise ManifestError(f"{path}: a row must be a mapping (got {_kind(row)})")
    with _locked(path):
        manifest = load_manifest(path)
        row_id = row.get("id")
        if row_id in manifest:
            raise ManifestError(f"{path}: experiment {row_id!r} already exists; give the new row "
                                "another id (e.g. another -suffix)")
        text = path.read_text(encoding="utf-8")
        first_prefix, indent = _append_layout(path, text)
        try:
            block = _render_row(dict(row), first_prefix, indent, comment)
        except yaml.YAMLError as exc:
            raise ManifestError(
                f"{path}: row {row_id!r} cannot be written as YAML: {exc}"
            ) from None
        if text and not text.endswith("\n"):
            block = "\n" + block
        size = path.stat().st_size
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(block)
        try:
            return load_manifest(path).get(row_id)
        except ManifestError as exc:
            with open(path, "r+b") as fh:
                fh.truncate(size)
            raise ManifestError(f"row not added to {path}: {exc}") from None


class _locked:
    """An exclusive advisory lock on `path` while a row is appended (POSIX; no-op elsewhere)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = None

    def __enter__(self) -> "_locked":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        if self.path.exists():
            self.fh = open(self.path, "rb")
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh is not None:
            self.fh.close()  # closing releases the lock


def _append_layout(path: Path, text: str) -> tuple[str, str]:
    """How the file's rows are indented: ('  - ', '    ') for `  - id: ...` rows."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    last = root.value[-1] if isinstance(root, yaml.MappingNode) and root.value else None
    if last is None or not isinstance(last[0], yaml.ScalarNode) or last[0].value != "experiments":
        raise ManifestError(f"{path}: rows can only be appended when `experiments:` is the last "
                            "block of the file; move it to the end")
    seq = last[1]
    if not isinstance(seq, yaml.SequenceNode) or seq.flow_style or not seq.value:
        raise ManifestError(f"{path}: `experiments:` must be a block list (`- id: ...` rows) to "
                            "append to it")
    first = seq.value[0]
    line = text.splitlines()[first.start_mark.line]
    column = first.start_mark.column
    dash = line.rfind("-", 0, column)
    if dash < 0 or line[:dash].strip():
        raise ManifestError(f"{path}: cannot tell how the rows of `experiments:` are indented")
    return " " * dash + "-" + " " * (column - dash - 1), " " * column


def _dump(key: Any, value: Any) -> list[str]:
    """`key: value` as YAML lines; lists and mappings of plain values on one line."""
    # default_flow_style=None writes collections of plain values in flow style ([0, 1, 2]), but
    # would also write {key: scalar} itself that way, hence False for a plain value.
    flow = None if isinstance(value, (list, dict)) else False
    text = yaml.safe_dump({key: value}, default_flow_style=flow, sort_keys=False,
                          allow_unicode=True, width=100_000)
    return text.rstrip("\n").split("\n")


def _render_row(row: dict[str, Any], first_prefix: str, indent: str,
                comment: str | None) -> str:
    blocks = ("args", "search")  # written last, one entry a line
    first = ("id", "table", "section", "label", "derived_from", "seeds")
    order = [k for k in first if k in row]
    order += [k for k in ROW_KEYS if k in row and k not in blocks and k not in order]
    order += [k for k in row if k not in ROW_KEYS] + [k for k in blocks if k in row]
    lines: list[str] = []
    for key in order:
        value = row[key]
        if key in ("args", "search") and isinstance(value, dict) and value:
            lines.append(f"{key}:")
            for sub_key, sub_value in value.items():
                lines.extend("  " + part for part in _dump(sub_key, sub_value))
        else:
            lines.extend(_dump(key, value))
    dash_indent = " " * (len(first_prefix) - len(first_prefix.lstrip(" ")))
    out = [""]
    if comment:
        out.extend(f"{dash_indent}# {part}".rstrip() for part in comment.splitlines())
    out.append(first_prefix + lines[0])
    out.extend(indent + part for part in lines[1:])
    return "\n".join(out) + "\n"
