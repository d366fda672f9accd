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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from lcp.config import IDENTITY_FIELDS, MODELS, TRAINERS, ConfigError, RunConfig
from lcp.errors import LcpError
from pipeline.manifest import schema
from pipeline.manifest.schema import TABLES

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

_SUFFIX = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"
_SUFFIX_RE = re.compile(rf"^{_SUFFIX}$")


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


ID_RE = re.compile(
    rf"^t(?P<table>[0-9]+)-(?P<model>{_alternatives(MODELS)})"
    rf"-(?P<trainer>{_alternatives(TRAINERS)})(?:-(?P<suffix>{_SUFFIX}))?$"
)

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
    paper: schema.PaperResult | None = None  # the paper's result for this row, when given

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
        # Not run from the repository root: the package's copy, pipeline/experiments.yaml (a
        # link to the repository's experiments.yaml in a checkout, the file itself in an
        # installed package).
        repo_copy = Path(__file__).resolve().parents[1] / DEFAULT_PATH
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
        try:
            doc = schema.validate(schema.ManifestDoc, data, context={"sections": tuple(SECTIONS)})
            experiments = [self.resolve(i, row, doc) for i, row in enumerate(doc.experiments)]
        except schema.SchemaError as exc:
            raise self.error(exc.loc, exc.reason) from None
        seen: dict[str, int] = {}
        for index, exp in enumerate(experiments):
            if exp.id in seen:
                raise self.error(("experiments", index, "id"),
                                 f"id {exp.id!r} is already used by row {seen[exp.id] + 1}")
            seen[exp.id] = index
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
    def resolve(self, index: int, row: schema.Row, doc: schema.ManifestDoc) -> Experiment:
        """The row with its section's args and the search spaces merged, checked as a whole."""
        where = ("experiments", index)
        if row.section not in SECTIONS:
            raise self.error(where + ("section",), f"section {row.section!r} is not valid; "
                             "sections are: " + ", ".join(SECTIONS))
        sec_table, sec_model = SECTIONS[row.section]
        if sec_table != row.table:
            raise self.error(where + ("section",), f"section {row.section!r} is in table "
                             f"{sec_table}, not table {row.table}")
        valid_labels = list(LABELS.values())
        if not any(row.label == v or row.label.startswith(v + " ") for v in valid_labels):
            raise self.error(where + ("label",), f"label {row.label!r} is not valid; labels "
                             "are: " + ", ".join(valid_labels))
        section = doc.sections.get(row.section) or schema.Section()
        merged = {**section.args, **row.args}
        seeds = row.seeds or doc.defaults.seeds or list(DEFAULT_SEEDS)
        try:
            cfg = RunConfig.from_dict({**merged, "seed": seeds[0]})
        except ConfigError as exc:
            name = exc.field
            if name is not None and name not in row.args and name in section.args:
                raise self.error(where + ("args", name),
                                 f"(from sections[{row.section!r}].args) {exc}",
                                 line_at=("sections", row.section, "args", name)) from None
            raise self.error(where + (("args", name) if name else ("args",)), str(exc)) from None
        args = {k: getattr(cfg, k) for k in merged}
        if sec_model != cfg.model:
            raise self.error(where + ("section",), f"section {row.section!r} holds model "
                             f"{sec_model!r} runs, but args give model {cfg.model!r}")
        self.check_identity(where, row, cfg)
        # search: defaults, then the section's, then the row's (null drops an entry)
        search: dict[str, dict[str, Any]] = dict(doc.defaults.search)
        origin: dict[str, tuple] = {p: ("defaults", "search", p) for p in search}
        for source, spec in ((("sections", row.section, "search"), section.search),
                             (where + ("search",), row.search)):
            for param, entry in spec.items():
                if entry is None:
                    search.pop(param, None)
                    origin.pop(param, None)
                else:
                    search[param], origin[param] = entry, source + (param,)
        for param, entry in search.items():
            try:
                schema.check_values(param, entry, {**args, "seed": seeds[0]})
            except schema.SchemaError as exc:
                src = origin[param]
                note = "" if src[0] == "experiments" else f" (from {'.'.join(map(str, src))})"
                raise self.error(where + ("search", param), exc.reason + note,
                                 line_at=src) from None
        return Experiment(id=row.id, table=row.table, section=row.section, label=row.label,
                          args=args, seeds=list(seeds), search=search,
                          derived_from=row.derived_from, paper=row.paper)

    def check_identity(self, where: tuple, row: schema.Row, cfg: RunConfig) -> None:
        """The id is t{table}-{model}-{trainer}[-suffix]; the label is the trainer's."""
        expected = f"t{row.table}-{cfg.model}-{cfg.trainer}"
        derived_from = row.derived_from
        if row.id == expected:
            if derived_from is not None:
                raise self.error(where + ("derived_from",), "only a derived row (id "
                                 f"{expected}-<suffix>) names derived_from; this row's id "
                                 "has no suffix")
        elif row.id.startswith(expected + "-") and _SUFFIX_RE.match(row.id[len(expected) + 1:]):
            if derived_from is None:
                raise self.error(where + ("derived_from",), f"row {row.id} has a suffix after "
                                 f"{expected}, so it must name the row it derives from "
                                 "(derived_from: <id>)")
            if not isinstance(derived_from, str):
                raise self.error(where + ("derived_from",),
                                 f"expected an id (got {schema.kind_of(derived_from)})")
        else:
            raise self.error(where + ("id",), f"id {row.id!r} does not match the row: expected "
                             f"{expected!r} (t{{table}}-{{model}}-{{trainer}} from table "
                             f"{row.table}, model {cfg.model}, trainer {cfg.trainer}; a derived "
                             "row may add -suffix)")
        paper_label = LABELS[cfg.trainer]
        if not (row.label == paper_label or (derived_from is not None and row.label.startswith(
                paper_label + " ") and row.label not in LABELS.values())):
            raise self.error(where + ("label",), f"label {row.label!r} does not match trainer "
                             f"{cfg.trainer!r}: the paper's label is {paper_label!r}"
                             + (" (a derived row may add text after it)"
                                if derived_from is not None else ""))


def _field(rest: tuple) -> str:
    if not rest:
        return ""
    text = ""
    for part in rest:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return f", field '{text}'"


# ====================================================================== appending a row


def write_row(path: str | os.PathLike[str], row: Mapping[str, Any], *,
              comment: str | None = None) -> Experiment:
    """Append `row` (a mapping as written in the YAML) to the `experiments:` list of the
    manifest at `path`, with `comment` above it.

    The file goes through a YAML round trip (ruamel.yaml) that keeps its comments, order and
    layout; the new text is checked by loading it and only then replaces the file, so a row that
    makes the manifest invalid leaves it as it was (ManifestError). Returns the new row, resolved.
    """
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.util import load_yaml_guess_indent

    path = Path(path)
    if not isinstance(row, Mapping):
        raise ManifestError(f"{path}: a row must be a mapping (got {schema.kind_of(row)})")
    with _locked(_resolve_path(path)):  # a missing file: one ManifestError
        manifest = load_manifest(path)
        row_id = row.get("id")
        if row_id in manifest:
            raise ManifestError(f"{path}: experiment {row_id!r} already exists; give the new row "
                                "another id (e.g. another -suffix)")
        text = path.read_text(encoding="utf-8")
        _, indent, dash = load_yaml_guess_indent(text)
        rt = YAML()
        rt.preserve_quotes = True
        rt.width = 100_000
        rt.indent(mapping=2, sequence=indent, offset=dash)
        document = rt.load(text)
        new = CommentedMap()
        for key, value in row.items():
            if isinstance(value, list):  # seeds: [0, 1, 2]
                value = CommentedSeq(value)
                value.fa.set_flow_style()
            elif isinstance(value, Mapping):  # args: and search: one entry a line
                value = CommentedMap({k: dict(v) if isinstance(v, Mapping) else v
                                      for k, v in value.items()})
            new[key] = value
        rows = document["experiments"]
        rows.append(new)
        _move_trailing_comment(rows[-2], new)  # what followed the last row (e.g. a comment
        # above the next block) still follows it
        if comment:
            rows.yaml_set_comment_before_after_key(len(rows) - 1, before="\n" + comment,
                                                   indent=dash)
        out = io.StringIO()
        rt.dump(document, out)
        try:
            added = _Loader(str(path), out.getvalue()).load(path).get(row_id)
        except ManifestError as exc:
            raise ManifestError(f"row not added to {path}: {exc}") from None
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(out.getvalue(), encoding="utf-8")
        os.replace(tmp, path)
        return added


def _last_entry(node) -> tuple[Any, Any] | None:
    """(container, key) of the entry a block-style YAML node ends with, as ruamel holds it."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    found = None
    while isinstance(node, (CommentedMap, CommentedSeq)) and node and not node.fa.flow_style():
        key = list(node)[-1] if isinstance(node, CommentedMap) else len(node) - 1
        found, node = (node, key), node[key]
    return found


def _move_trailing_comment(old, new) -> None:
    src, dst = _last_entry(old), _last_entry(new)
    if src is None or dst is None:
        return
    (container, key), (target, target_key) = src, dst
    entry = container.ca.items.get(key)
    slot = 2 if isinstance(key, str) else 0
    if entry and entry[slot] is not None:
        target.ca.items.setdefault(target_key, [None] * 4)[2 if isinstance(target_key, str)
                                                           else 0] = entry[slot]
        entry[slot] = None


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` while a row is appended (closing releases it)."""
    import fcntl

    with open(path, "rb") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
