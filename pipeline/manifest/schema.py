"""The one schema of what the pipeline reads: manifest files (defaults, sections, rows) and search
spaces (a row's `search:` block, `lcp tune --space`, a study's stored space), as pydantic models.

A run's settings are `lcp.config.RunConfig` (their kinds, `IDENTITY_FIELDS` and `NOT_HASHED` are
defined there, once); the models here check a row's `args` and every search bound or choice
through it. Every problem is one `SchemaError` with `loc`, the path of the field in the document
(e.g. `("experiments", 3, "search", "alpha", "low")`), and `reason`; `pipeline.manifest.manifest`
turns it into `file:line: experiment row 4 (id ...), field 'search.alpha.low': reason`.

    space = check_space({"alpha": {"type": "float", "low": 0.01, "high": 1.5, "log": True}},
                        base_args)                        # normalised {name: entry}
    name, entry = parse_space_option("alpha=0.01:1.5:log")
    doc = validate(ManifestDoc, yaml_data)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import (BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from lcp.config import IDENTITY_FIELDS, ConfigError, RunConfig, parse_bool
from lcp.errors import LcpError

FIELD_KINDS: dict[str, str] = RunConfig.field_kinds()
SEARCH_TYPES = ("float", "int", "categorical")
SEARCH_KEYS = ("type", "low", "high", "log", "choices")
TABLES: tuple[int, ...] = (1, 2)


class SchemaError(LcpError):
    """One problem at `loc` (a path into the document) with `reason`."""

    def __init__(self, loc: tuple, reason: str):
        super().__init__(f"{'.'.join(map(str, loc))}: {reason}" if loc else reason)
        self.loc, self.reason = tuple(loc), reason


def fail(reason: str, *at: Any) -> PydanticCustomError:
    """The error a validator raises: `reason` at `at` below the validated value's place."""
    return PydanticCustomError("lcp", "{reason}", {"reason": reason, "at": at})


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


_BUILTIN = {  # pydantic's own error types, in this project's words
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected text", "list_type": "expected a list", "dict_type":
    "expected a mapping", "model_type": "expected a mapping", "int_type": "expected an integer",
    "int_parsing": "expected an integer", "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
}


def validate(model: type[BaseModel], data: Any, loc: tuple = (), context: Any = None):
    """`model` validated from `data`; the first problem raised as a SchemaError."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise schema_error(exc, loc) from None


def schema_error(exc: ValidationError, loc: tuple = ()) -> SchemaError:
    error = exc.errors(include_url=False)[0]
    ctx = error.get("ctx") or {}
    where = loc + tuple(error["loc"]) + tuple(ctx.get("at", ()))
    if error["type"] == "lcp":
        return SchemaError(where, ctx["reason"])
    text = _BUILTIN.get(error["type"], error["msg"])
    return SchemaError(where, f"{text} (got {kind_of(error.get('input'))})")


class Strict(BaseModel):
    """A mapping with known keys: unknown keys and missing required keys are named."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        keys = tuple(cls.model_fields)
        if not isinstance(data, Mapping):
            raise fail(f"expected a mapping with keys {', '.join(cls.REQUIRED or keys)} "
                       f"(got {kind_of(data)})")
        for key in data:
            if key not in keys:
                raise fail(f"unknown key {key!r}; valid keys are: {', '.join(keys)}", key)
        for key in cls.REQUIRED:
            if key not in data:
                raise fail(f"required key {key!r} is missing", key)
        return data


# ====================================================================== search spaces


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchRange(_Entry):
    """A float or int range: {type, low, high, log}."""

    type: Literal["float", "int"]
    low: float
    high: float
    log: bool = False

    @model_validator(mode="before")
    @classmethod
    def _bounds(cls, data: Any) -> Any:
        kind, data = data.get("type"), dict(data)
        if "choices" in data:
            raise fail(f"a {kind} entry takes low/high, not choices", "choices")
        for key in ("low", "high"):
            if key not in data:
                raise fail(f"a {kind} entry needs {key!r}", key)
            data[key] = _number(data[key], kind, key)
        log = data.get("log", False)
        if not isinstance(log, bool):
            raise fail(f"expected true or false (got {log!r})", "log")
        if not data["low"] < data["high"]:
            raise fail(f"low must be < high (got low={data['low']}, high={data['high']})", "low")
        if log and not data["low"] > 0:
            raise fail(f"a log-scale range needs low > 0 (got low={data['low']})", "log")
        return data

    def as_dict(self) -> dict[str, Any]:
        number = int if self.type == "int" else float
        return {"type": self.type, "low": number(self.low), "high": number(self.high),
                "log": self.log}


class SearchChoices(_Entry):
    """A categorical entry: {type: categorical, choices: [...]}."""

    type: Literal["categorical"]
    choices: Any = None

    @model_validator(mode="before")
    @classmethod
    def _choices(cls, data: Any) -> Any:
        for key in ("low", "high", "log"):
            if key in data:
                raise fail(f"a categorical entry takes `choices`, not {key!r}", key)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"expected a non-empty list of values (got {kind_of(choices)})", "choices")
        for choice in choices:
            if isinstance(choice, (Mapping, list)) or choice is None:
                raise fail(f"choices must be single values (got {choice!r})", "choices")
        if len({repr(c) for c in choices}) != len(choices):
            raise fail(f"choices repeat: {choices}", "choices")
        return data

    def as_dict(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


def _number(value: Any, kind: str, key: str) -> int | float:
    number = None
    if not isinstance(value, bool):
        if kind == "int":
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                number = int(value)
        elif isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text
            try:
                number = float(value)
            except ValueError:
                pass
    if number is None:
        raise fail(f"{value!r} is not {'an integer' if kind == 'int' else 'a number'}", key)
    if not math.isfinite(number):
        raise fail(f"{value!r} is not a finite number", key)
    return number


def check_param(name: str) -> None:
    """A tunable parameter: a RunConfig field that does not define the experiment."""
    if name not in FIELD_KINDS:
        raise SchemaError((name,), f"unknown parameter {name!r}: a search parameter must be a "
                          "RunConfig field; fields are: " + ", ".join(
                              n for n in FIELD_KINDS if n not in IDENTITY_FIELDS))
    if name in IDENTITY_FIELDS:
        raise SchemaError((name,), f"{name!r} cannot be tuned (searched): it defines the "
                          "experiment")


def check_entry(name: str, entry: Any) -> dict[str, Any]:
    """One parameter's entry, validated against the parameter's kind and normalised."""
    check_param(name)
    if not isinstance(entry, Mapping):
        raise SchemaError((name,), f"expected a mapping with keys {', '.join(SEARCH_KEYS)} "
                          f"(got {kind_of(entry)})")
    for key in entry:
        if key not in SEARCH_KEYS:
            raise SchemaError((name, key), f"unknown key {key!r}; valid keys are: "
                              + ", ".join(SEARCH_KEYS))
    if entry.get("type") not in SEARCH_TYPES:
        raise SchemaError((name, "type"), f"type must be one of {', '.join(SEARCH_TYPES)} (got "
                          f"{entry.get('type')!r})")
    model = SearchChoices if entry["type"] == "categorical" else SearchRange
    value = validate(model, entry, (name,))
    field_kind = FIELD_KINDS[name]
    if value.type != "categorical" and (field_kind not in ("int", "float") or (
            value.type == "float" and field_kind == "int")):
        hint = "type: int" if field_kind == "int" else "type: categorical"
        raise SchemaError((name, "type"), f"{name} takes {field_kind} values: a {value.type} "
                          f"range does not fit it (use {hint})")
    return value.as_dict()


def check_values(name: str, entry: Mapping[str, Any], base: Mapping[str, Any]) -> None:
    """Every choice (or both bounds) of `entry` is a valid `name` for the config `base`."""
    values = entry["choices"] if entry["type"] == "categorical" else [entry["low"], entry["high"]]
    for value in values:
        try:
            RunConfig.from_dict({**base, name: value})
        except ConfigError as exc:
            raise SchemaError((name,), f"value {value!r} is not a valid {name}: {exc}") from None


def check_space(space: Any, base: Mapping[str, Any] | None = None,
                allow_null: bool = False) -> dict[str, dict[str, Any] | None]:
    """A validated, normalised search space {param: entry} (None entries kept when
    `allow_null`: they drop an inherited entry); with `base` (a config as a dict) every bound
    and choice is also checked as a value of that config."""
    if space is None:
        return {}
    if not isinstance(space, Mapping):
        raise SchemaError((), "expected a mapping of parameter: {type, low, high, log} or "
                          f"{{type: categorical, choices}} (got {kind_of(space)})")
    out: dict[str, dict[str, Any] | None] = {}
    for name, entry in space.items():
        if entry is None and allow_null:
            check_param(name)
            out[name] = None
            continue
        out[name] = check_entry(name, entry)
        if base is not None:
            check_values(name, out[name], base)
    return out


def parse_space_option(text: str) -> tuple[str, dict[str, Any]]:
    """--space 'alpha=0.01:1.5:log' | 'k_p=0:1' | 'solver=vanilla,anderson' → (name, entry)."""
    if not isinstance(text, str) or "=" not in text:
        raise SchemaError((), "expected PARAM=LOW:HIGH[:log] or PARAM=A,B,... (e.g. --space "
                          "alpha=0.01:1.5:log)")
    name, value = (part.strip() for part in text.split("=", 1))
    name = name if name in FIELD_KINDS else name.replace("-", "_")
    check_param(name)
    kind = FIELD_KINDS[name]
    if ":" in value:
        parts = [p.strip() for p in value.split(":")]
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].lower() != "log"):
            raise SchemaError((name,), "a range is LOW:HIGH or LOW:HIGH:log")
        if kind not in ("int", "float"):
            raise SchemaError((name,), f"{name} takes {kind} values, not a range; give choices "
                              f"instead ({name}=A,B,...)")
        # bounds are checked with the row (check_space), where the error names it
        return name, {"type": kind, "low": _text_number(parts[0]),
                      "high": _text_number(parts[1]), "log": len(parts) == 3}
    choices: list[Any] = []
    for choice in filter(None, (p.strip() for p in value.split(","))):
        try:
            choices.append(int(float(choice)) if kind == "int" else float(choice)
                           if kind == "float" else parse_bool(choice) if kind == "bool"
                           else choice)
        except ValueError:
            raise SchemaError((name,), f"{choice!r} is not a valid {kind} for {name}") from None
    return name, check_entry(name, {"type": "categorical", "choices": choices})


def _text_number(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() \
        else number


# ====================================================================== manifest files


# ====================================================================== the paper's numbers

PAPER_STATS = ("test_acc", "train_acc", "test_nll", "train_nll")


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float | None  # None: one exact value (no spread given)


@dataclass(frozen=True)
class PaperResult:
    """A row's result as the paper publishes it: mean ± std over `n` seeds of the test accuracy
    (%), and where the paper gives them the train accuracy (%) and the train/test NLL (the mean
    cross-entropy). A bare number in the manifest is one exact test accuracy (n None)."""

    test_acc: MeanStd
    n: int | None = None
    train_acc: MeanStd | None = None
    test_nll: MeanStd | None = None
    train_nll: MeanStd | None = None
    source: str = ""


def _mean_std(value: Any, name: str) -> MeanStd:
    number = lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if not (isinstance(value, list) and len(value) == 2 and all(map(number, value))
            and value[1] >= 0):
        raise fail(f"expected [mean, std]: two numbers, the std ≥ 0 (got {kind_of(value)})", name)
    if name.endswith("_acc") and not 0 <= value[0] <= 100:
        raise fail(f"expected an accuracy in % (a mean from 0 to 100; got {value[0]!r})", name)
    return MeanStd(float(value[0]), float(value[1]))


def check_paper(value: Any) -> PaperResult:
    """`paper:` of a row: a number (the test accuracy in %), or a mapping with `test_acc:
    [mean, std]`, the seed count `n` (≥ 2) and optionally `train_acc`, `test_nll`, `train_nll`
    (each [mean, std]) and `source` (where in the paper)."""
    usage = ("expected the paper's test accuracy in % (a number from 0 to 100), or a mapping "
             "with test_acc: [mean, std], n: seeds (≥ 2) and optionally train_acc, test_nll, "
             "train_nll ([mean, std]) and source")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and 0 <= value <= 100):
            raise fail(f"{usage} (got {value!r})")
        return PaperResult(MeanStd(float(value), None))
    if not isinstance(value, Mapping):
        raise fail(f"{usage} (got {kind_of(value)})")
    keys = ("n", "source") + PAPER_STATS
    for key in value:
        if key not in keys:
            raise fail(f"unknown key {key!r}; valid keys are: {', '.join(keys)}", key)
    for key in ("test_acc", "n"):
        if key not in value:
            raise fail(f"required key {key!r} is missing ({usage})", key)
    n = value["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise fail(f"expected the number of seeds, an integer ≥ 2 (got {kind_of(n)})", "n")
    source = value.get("source", "")
    if not isinstance(source, str):
        raise fail(f"expected text (got {kind_of(source)})", "source")
    stats = {k: _mean_std(value[k], k) for k in PAPER_STATS if value.get(k) is not None}
    return PaperResult(n=n, source=source, **stats)


def check_args(args: Any) -> dict[str, Any]:
    """A row's or section's flags: RunConfig fields (not `seed`), single values."""
    if not isinstance(args, Mapping):
        raise fail(f"expected a mapping of flag: value (got {kind_of(args)})")
    for name, value in args.items():
        if name == "seed":
            raise fail("the seed is not a flag of the row: list the row's seeds under `seeds`",
                       name)
        if name not in FIELD_KINDS:
            raise fail(f"unknown flag {name!r}; valid flags (RunConfig fields) are: "
                       + ", ".join(n for n in FIELD_KINDS if n != "seed"), name)
        if value is None or isinstance(value, (Mapping, list)):
            raise fail(f"expected a single value (got {kind_of(value)})", name)
    return dict(args)


def check_seeds(seeds: Any) -> list[int]:
    if not isinstance(seeds, list) or not seeds:
        raise fail(f"expected a non-empty list of integers ≥ 0 (got {kind_of(seeds)})")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise fail(f"seeds must be integers ≥ 0 (got {seed!r})")
    if len(set(seeds)) != len(seeds):
        raise fail(f"seeds repeat: {seeds}")
    return list(seeds)


def _search(spec: Any, allow_null: bool) -> dict:
    try:
        return check_space(spec, allow_null=allow_null)
    except SchemaError as exc:
        raise fail(exc.reason, *exc.loc) from None


Args = Annotated[dict[str, Any], BeforeValidator(check_args)]
Seeds = Annotated[list[int], BeforeValidator(check_seeds)]
Space = Annotated[dict[str, Any], BeforeValidator(lambda v: _search(v, allow_null=False))]
SpaceOrNull = Annotated[dict[str, Any], BeforeValidator(lambda v: _search(v, allow_null=True))]


class Defaults(Strict):
    seeds: Seeds | None = None
    search: Space = {}


class Section(Strict):
    args: Args = {}
    search: SpaceOrNull = {}


class Row(Strict):
    """One row as written in the file (`pipeline.manifest.manifest` resolves it against its
    section)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("id", "table", "section", "label", "args")
    id: str
    table: int
    section: str
    label: str
    args: Args
    seeds: Seeds | None = None
    search: SpaceOrNull = {}
    derived_from: Any = None
    paper: Any = None  # the paper's result for this row (PaperResult; see check_paper)

    @field_validator("table", mode="before")
    @classmethod
    def _table(cls, value: Any) -> int:
        if isinstance(value, bool) or value not in TABLES:
            raise fail(f"table must be one of {', '.join(map(str, TABLES))} (got {value!r})")
        return value

    @field_validator("paper", mode="before")
    @classmethod
    def _paper(cls, value: Any) -> Any:
        return None if value is None else check_paper(value)


class ManifestDoc(Strict):
    """A whole manifest file."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("experiments",)
    defaults: Defaults = Defaults()
    sections: dict[str, Section] = {}
    experiments: list[Row]

    @field_validator("defaults", "sections", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("sections", mode="before")
    @classmethod
    def _sections(cls, value: Any, info) -> Any:
        names = (info.context or {}).get("sections", ())
        if not isinstance(value, Mapping):
            raise fail(f"expected a mapping (got {kind_of(value)})")
        for name in value:
            if names and name not in names:
                raise fail(f"unknown section {name!r}; sections are: {', '.join(names)}", name)
        return value

    @field_validator("experiments", mode="before")
    @classmethod
    def _rows(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise fail(f"expected a non-empty list of rows (got {kind_of(value)})")
        return value
