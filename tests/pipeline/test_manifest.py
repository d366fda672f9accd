"""experiments.yaml and pipeline.manifest.manifest: the 15 paper runs, validation, overrides, new
rows."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from lcp.config import RunConfig
from lcp.errors import LcpError
from paper_flags import parse_command_line
from pipeline.manifest.manifest import (Experiment, ManifestError, load_manifest, parse_id,
                                        parse_overrides, write_row)

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "experiments.yaml"
COMMAND_LINES = REPO / "tests" / "data" / "paper_command_lines.txt"


def paper_lines() -> list[tuple[str, str]]:
    """(id, command line) pairs of tests/data/paper_command_lines.txt, in file order."""
    pairs, pending = [], None
    for raw in COMMAND_LINES.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# "):
            pending = line[2:].strip()
        elif line:
            assert pending is not None, f"command line without an id comment: {line}"
            pairs.append((pending, line))
            pending = None
    return pairs


PAPER = paper_lines()

EXPECTED = [
    # id, table, section, label
    ("t1-ff-bp", 1, "MNIST FF", "BP"),
    ("t1-ff-lcp-ebd", 1, "MNIST FF", "LCP-EBD"),
    ("t1-ff-lcp-di", 1, "MNIST FF", "LCP-DI"),
    ("t1-ff-lcp-kp", 1, "MNIST FF", "LCP-DI (KP)"),
    ("t1-ff-lcp-lf", 1, "MNIST FF", "LCP-LF"),
    ("t1-rnn-rbp", 1, "MNIST RNN", "RBP"),
    ("t1-rnn-lcp-ebd", 1, "MNIST RNN", "LCP-EBD"),
    ("t1-rnn-lcp-di", 1, "MNIST RNN", "LCP-DI"),
    ("t1-rnn-lcp-kp", 1, "MNIST RNN", "LCP-DI (KP)"),
    ("t1-rnn-lcp-lf", 1, "MNIST RNN", "LCP-LF"),
    ("t2-conv-ff-bp", 2, "CIFAR-10 FF", "BP"),
    ("t2-conv-ff-lcp-di", 2, "CIFAR-10 FF", "LCP-DI"),
    ("t2-conv-ff-lcp-kp", 2, "CIFAR-10 FF", "LCP-DI (KP)"),
    ("t2-conv-rnn-rbp", 2, "CIFAR-10 RNN", "RBP"),
    ("t2-conv-rnn-lcp-di", 2, "CIFAR-10 RNN", "LCP-DI"),
]


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MANIFEST)


# ====================================================================== the paper's 15 runs


def test_command_line_file_has_the_15_runs_in_table_order():
    assert [i for i, _ in PAPER] == [row[0] for row in EXPECTED]
    for _, line in PAPER:
        assert line.startswith("python3 run_classification.py --")
        assert "\\" not in line


@pytest.mark.parametrize("exp_id,line", PAPER, ids=[i for i, _ in PAPER])
def test_row_config_equals_paper_command_line(manifest, exp_id, line):
    flags = parse_command_line(line)
    expected = RunConfig.from_dict(flags | {"seed": 0})
    exp = manifest.get(exp_id)
    assert exp.config(seed=0).to_dict() == expected.to_dict()
    assert exp.config(seed=0).config_hash() == expected.config_hash()
    # the resolved args are exactly the line's flags (no more, no fewer)
    assert set(exp.args) == set(flags)
    for name in flags:
        assert exp.args[name] == getattr(expected, name), name


def test_ids_tables_sections_labels_and_default_seeds(manifest):
    assert [(e.id, e.table, e.section, e.label) for e in manifest.experiments] == EXPECTED
    assert all(e.seeds == [0, 1, 2] for e in manifest)
    assert all(e.search == {} and e.derived_from is None for e in manifest)
    assert manifest.path == MANIFEST
    assert len(manifest) == 15


def test_ids_follow_table_model_trainer(manifest):
    for exp in manifest:
        assert exp.id == f"t{exp.table}-{exp.model}-{exp.trainer}"
        assert parse_id(exp.id) == (exp.table, exp.model, exp.trainer, None)
    assert parse_id("t1-ff-lcp-di-tuned") == (1, "ff", "lcp-di", "tuned")
    assert parse_id("t2-conv-rnn-rbp") == (2, "conv-rnn", "rbp", None)
    with pytest.raises(ManifestError, match="t\\{table\\}"):
        parse_id("table1-ff-bp")


def test_default_path_loads_the_repository_manifest(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no experiments.yaml here: falls back to the repository's
    assert load_manifest().ids() == [row[0] for row in EXPECTED]


def test_get_unknown_id_lists_valid_ids(manifest):
    with pytest.raises(ManifestError) as info:
        manifest.get("t1-ff-nope")
    assert "t1-ff-nope" in str(info.value)
    assert "t1-ff-bp" in str(info.value) and "t2-conv-rnn-lcp-di" in str(info.value)
    assert isinstance(info.value, LcpError)


def test_tables_and_sections(manifest):
    assert manifest.tables() == [1, 2]
    assert [e.id for e in manifest.table(2)] == [row[0] for row in EXPECTED[10:]]
    assert manifest.table("1") == manifest.table(1)
    assert manifest.sections(1) == ["MNIST FF", "MNIST RNN"]
    assert manifest.sections(2) == ["CIFAR-10 FF", "CIFAR-10 RNN"]
    with pytest.raises(ManifestError, match="tables are: 1, 2"):
        manifest.table(3)
    with pytest.raises(ManifestError, match="tables are: 1, 2"):
        manifest.sections(0)


@pytest.mark.parametrize(
    "exp_id,baseline_id",
    [
        ("t1-ff-lcp-di", "t1-ff-bp"),
        ("t1-ff-lcp-ebd", "t1-ff-bp"),
        ("t1-rnn-lcp-kp", "t1-rnn-rbp"),
        ("t1-rnn-lcp-lf", "t1-rnn-rbp"),
        ("t2-conv-ff-lcp-kp", "t2-conv-ff-bp"),
        ("t2-conv-rnn-lcp-di", "t2-conv-rnn-rbp"),
        ("t1-ff-bp", "t1-ff-bp"),
    ],
)
def test_baseline(manifest, exp_id, baseline_id):
    assert manifest.baseline(manifest.get(exp_id)).id == baseline_id
    assert manifest.baseline(exp_id).id == baseline_id


def test_baseline_is_none_without_a_baseline_row(tmp_path):
    data = minimal()
    data["experiments"] = [data["experiments"][1]]  # only the LCP-DI row
    path = write_yaml(tmp_path, data)
    m = load_manifest(path)
    assert m.baseline("t1-ff-lcp-di") is None


def test_config_seed_and_overrides(manifest):
    exp = manifest.get("t1-ff-lcp-di")
    cfg = exp.config(seed=2, overrides=parse_overrides(["num_epochs=1", "device=cpu"]))
    assert (cfg.seed, cfg.num_epochs, cfg.device, cfg.alpha) == (2, 1, "cpu", 0.1)
    assert [c.seed for c in exp.configs()] == [0, 1, 2]
    with pytest.raises(ManifestError, match="t1-ff-lcp-di.*num_epochs"):
        exp.config(seed=0, overrides={"num_epochs": "zero"})
    with pytest.raises(ManifestError, match="trainer"):
        exp.config(seed=0, overrides={"trainer": "bp"})
    with pytest.raises(ManifestError, match="seed"):
        exp.config(seed=-1)
    # the row itself is not changed by overrides
    assert exp.config(seed=0).num_epochs == 30


# ====================================================================== parse_overrides


def test_parse_overrides():
    assert parse_overrides([]) == {}
    assert parse_overrides(["num_epochs=1", "meta_lr=1e-3", "out_dir=a=b"]) == {
        "num_epochs": "1",
        "meta_lr": "1e-3",
        "out_dir": "a=b",
    }
    assert parse_overrides(["limit-train-batches=2"]) == {"limit_train_batches": "2"}


@pytest.mark.parametrize(
    "items,match",
    [
        (["num_epochs"], "key=value"),
        (["nope=1"], "unknown setting 'nope'.*valid settings are: .*num_epochs"),
        (["num_epochs=1", "num_epochs=2"], "twice"),
    ],
)
def test_parse_overrides_errors(items, match):
    with pytest.raises(ManifestError, match=match):
        parse_overrides(items)


# ====================================================================== validation


def minimal() -> dict:
    """A small valid manifest (as data) that the validation tests break one field at a time."""
    return {
        "defaults": {"seeds": [0, 1, 2]},
        "sections": {"MNIST FF": {"args": {"data": "mnist", "model": "ff", "num_epochs": 30}}},
        "experiments": [
            {"id": "t1-ff-bp", "table": 1, "section": "MNIST FF", "label": "BP",
             "args": {"trainer": "bp"}},
            {"id": "t1-ff-lcp-di", "table": 1, "section": "MNIST FF", "label": "LCP-DI",
             "args": {"trainer": "lcp-di", "alpha": 0.1, "solver_max_iter": 800}},
        ],
    }


def write_yaml(tmp_path: Path, data: dict | str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return path


def test_minimal_manifest_is_valid(tmp_path):
    m = load_manifest(write_yaml(tmp_path, minimal(), "ok.yaml"))
    assert m.ids() == ["t1-ff-bp", "t1-ff-lcp-di"]
    assert m.get("t1-ff-lcp-di").args == {
        "data": "mnist", "model": "ff", "num_epochs": 30,
        "trainer": "lcp-di", "alpha": 0.1, "solver_max_iter": 800,
    }


def row(data: dict, i: int = 1) -> dict:
    return data["experiments"][i]


# Each case: how to break minimal(), then what the one error must name: the row, the field, and
# a fragment of the reason.
CASES = {
    "unknown top-level key": (
        lambda d: d.update(experimentz=[]), "top-level key 'experimentz'", None, "unknown key"),
    "missing experiments": (
        lambda d: d.pop("experiments"), "top-level key 'experiments'", None, "missing"),
    "unknown defaults key": (
        lambda d: d["defaults"].update(seed=1), "defaults", "seed", "unknown key"),
    "unknown section name": (
        lambda d: d["sections"].update({"MNIST CNN": {"args": {}}}), "section 'MNIST CNN'", None,
        "unknown section"),
    "unknown section flag": (
        lambda d: d["sections"]["MNIST FF"]["args"].update(lr=1), "section 'MNIST FF'",
        "args.lr", "unknown flag"),
    "unknown row key": (
        lambda d: row(d).update(note="x"), "t1-ff-lcp-di", "note", "unknown key"),
    "missing label": (
        lambda d: row(d).pop("label"), "t1-ff-lcp-di", "label", "missing"),
    "missing args": (
        lambda d: row(d).pop("args"), "t1-ff-lcp-di", "args", "missing"),
    "missing id": (
        lambda d: row(d).pop("id"), "row 2", "id", "missing"),
    "row not a mapping": (
        lambda d: d["experiments"].__setitem__(1, "t1-ff-lcp-di"), "row 2", None,
        "expected a mapping"),
    "id not text": (
        lambda d: row(d).update(id=12), "row 2", "id", "expected text"),
    "id of the wrong form": (
        lambda d: row(d).update(id="ff-lcp-di"), "ff-lcp-di", "id", "t1-ff-lcp-di"),
    "id not matching trainer": (
        lambda d: row(d).update(id="t1-ff-lcp-kp"), "t1-ff-lcp-kp", "id", "t1-ff-lcp-di"),
    "id not matching table": (
        lambda d: row(d).update(id="t2-ff-lcp-di"), "t2-ff-lcp-di", "id", "t1-ff-lcp-di"),
    "duplicate id": (
        lambda d: d["experiments"].append(copy.deepcopy(row(d))), "row 3", "id",
        "already used by row 2"),
    "table not 1 or 2": (
        lambda d: row(d).update(table=3), "t1-ff-lcp-di", "table", "1, 2"),
    "table not an int": (
        lambda d: row(d).update(table="one"), "t1-ff-lcp-di", "table", "1, 2"),
    "unknown section": (
        lambda d: row(d).update(section="MNIST CNN"), "t1-ff-lcp-di", "section",
        "MNIST FF, MNIST RNN, CIFAR-10 FF, CIFAR-10 RNN"),
    "section of the other table": (
        lambda d: row(d).update(section="CIFAR-10 FF"), "t1-ff-lcp-di", "section", "table 2"),
    "section of another model": (
        lambda d: (row(d).update(section="MNIST RNN"), row(d)["args"].update(model="ff")),
        "t1-ff-lcp-di", "section", "model 'ff'"),
    "unknown label": (
        lambda d: row(d).update(label="LCP"), "t1-ff-lcp-di", "label", "labels are: BP, RBP"),
    "label of another trainer": (
        lambda d: row(d).update(label="LCP-DI (KP)"), "t1-ff-lcp-di", "label", "'LCP-DI'"),
    "args not a mapping": (
        lambda d: row(d).update(args=["--trainer=lcp-di"]), "t1-ff-lcp-di", "args",
        "mapping"),
    "unknown flag": (
        lambda d: row(d)["args"].update(learning_rate=0.1), "t1-ff-lcp-di",
        "args.learning_rate", "valid flags"),
    "flag without a value": (
        lambda d: row(d)["args"].update(alpha=None), "t1-ff-lcp-di", "args.alpha",
        "expected a single value"),
    "seed as a flag": (
        lambda d: row(d)["args"].update(seed=1), "t1-ff-lcp-di", "args.seed", "seeds"),
    "flag value of the wrong type": (
        lambda d: row(d)["args"].update(alpha="big"), "t1-ff-lcp-di", "args.alpha",
        "expected a number"),
    "flag value outside its choices": (
        lambda d: row(d)["args"].update(meta_optimizer="rmsprop"), "t1-ff-lcp-di",
        "args.meta_optimizer", "adam, sgd"),
    "flag value out of range": (
        lambda d: row(d)["args"].update(solver_max_iter=0), "t1-ff-lcp-di",
        "args.solver_max_iter", "≥ 1"),
    "bad value inherited from the section": (
        lambda d: d["sections"]["MNIST FF"]["args"].update(num_epochs="many"), "t1-ff-bp",
        "args.num_epochs", "sections['MNIST FF'].args"),
    "unknown trainer": (
        lambda d: row(d)["args"].update(trainer="lcp-xx"), "t1-ff-lcp-di", "args.trainer",
        "valid values are"),
    "unsupported model/trainer pair": (
        lambda d: (d["sections"].update({"CIFAR-10 RNN": {"args": {
            "data": "cifar10", "model": "conv-rnn"}}}),
            d["experiments"].append({"id": "t2-conv-rnn-lcp-kp", "table": 2,
                                     "section": "CIFAR-10 RNN", "label": "LCP-DI (KP)",
                                     "args": {"trainer": "lcp-kp"}})),
        "t2-conv-rnn-lcp-kp", "args.trainer", "does not run on model 'conv-rnn'"),
    "model missing": (
        lambda d: d["sections"].clear(), "t1-ff-bp", "args.model", "must be given"),
    "seeds not a list": (
        lambda d: row(d).update(seeds=3), "t1-ff-lcp-di", "seeds", "list of integers"),
    "seeds negative": (
        lambda d: row(d).update(seeds=[0, -1]), "t1-ff-lcp-di", "seeds", "≥ 0"),
    "seeds not integers": (
        lambda d: row(d).update(seeds=[0, "1"]), "t1-ff-lcp-di", "seeds", "integers"),
    "seeds bool": (
        lambda d: row(d).update(seeds=[True]), "t1-ff-lcp-di", "seeds", "integers"),
    "defaults seeds bad": (
        lambda d: d["defaults"].update(seeds=[1.5]), "defaults", "seeds", "integers"),
    "derived_from on a paper row": (
        lambda d: row(d).update(derived_from="t1-ff-bp"), "t1-ff-lcp-di", "derived_from",
        "suffix"),
    "suffix without derived_from": (
        lambda d: row(d).update(id="t1-ff-lcp-di-tuned"), "t1-ff-lcp-di-tuned", "derived_from",
        "derives from"),
    "derived_from unknown": (
        lambda d: row(d).update(id="t1-ff-lcp-di-tuned", derived_from="t1-ff-lcp-dx"),
        "t1-ff-lcp-di-tuned", "derived_from", "t1-ff-bp"),
    # search spaces
    "search not a mapping": (
        lambda d: row(d).update(search=["meta_lr"]), "t1-ff-lcp-di", "search", "mapping"),
    "search unknown param": (
        lambda d: row(d).update(search={"lr": {"type": "float", "low": 0.1, "high": 1}}),
        "t1-ff-lcp-di", "search.lr", "RunConfig field"),
    "search identity param": (
        lambda d: row(d).update(search={"trainer": {"type": "categorical", "choices": ["bp"]}}),
        "t1-ff-lcp-di", "search.trainer", "defines the experiment"),
    "search bad type": (
        lambda d: row(d).update(search={"meta_lr": {"type": "loguniform", "low": 0.1,
                                                    "high": 1}}),
        "t1-ff-lcp-di", "search.meta_lr.type", "float, int, categorical"),
    "search low not below high": (
        lambda d: row(d).update(search={"meta_lr": {"type": "float", "low": 1, "high": 0.1}}),
        "t1-ff-lcp-di", "search.meta_lr.low", "low must be < high"),
    "search log needs positive low": (
        lambda d: row(d).update(search={"k_p": {"type": "float", "low": 0, "high": 1,
                                                "log": True}}),
        "t1-ff-lcp-di", "search.k_p.log", "low > 0"),
    "search log not bool": (
        lambda d: row(d).update(search={"k_p": {"type": "float", "low": 0.1, "high": 1,
                                                "log": "yes"}}),
        "t1-ff-lcp-di", "search.k_p.log", "true or false"),
    "search missing high": (
        lambda d: row(d).update(search={"k_p": {"type": "float", "low": 0.1}}),
        "t1-ff-lcp-di", "search.k_p.high", "needs 'high'"),
    "search unknown entry key": (
        lambda d: row(d).update(search={"k_p": {"type": "float", "low": 0.1, "high": 1,
                                                "step": 0.1}}),
        "t1-ff-lcp-di", "search.k_p.step", "unknown key"),
    "search float range on an int field": (
        lambda d: row(d).update(search={"num_epochs": {"type": "float", "low": 1, "high": 3}}),
        "t1-ff-lcp-di", "search.num_epochs.type", "type: int"),
    "search int bounds not integers": (
        lambda d: row(d).update(search={"num_epochs": {"type": "int", "low": 1.5, "high": 3}}),
        "t1-ff-lcp-di", "search.num_epochs.low", "integer"),
    "search categorical without choices": (
        lambda d: row(d).update(search={"meta_optimizer": {"type": "categorical"}}),
        "t1-ff-lcp-di", "search.meta_optimizer.choices", "non-empty list"),
    "search categorical with low": (
        lambda d: row(d).update(search={"meta_optimizer": {"type": "categorical", "low": 1,
                                                           "choices": ["sgd"]}}),
        "t1-ff-lcp-di", "search.meta_optimizer.low", "choices"),
    "search choice RunConfig rejects": (
        lambda d: row(d).update(search={"meta_optimizer": {"type": "categorical",
                                                           "choices": ["sgd", "rmsprop"]}}),
        "t1-ff-lcp-di", "search.meta_optimizer", "rmsprop"),
    "search bound RunConfig rejects": (
        lambda d: row(d).update(search={"solver_max_iter": {"type": "int", "low": 0,
                                                            "high": 10}}),
        "t1-ff-lcp-di", "search.solver_max_iter", "≥ 1"),
    "defaults search bad": (
        lambda d: d["defaults"].update(search={"meta_lr": {"type": "float", "low": 0,
                                                           "high": 1, "log": True}}),
        "defaults", "search.meta_lr.log", "low > 0"),
    "defaults search unknown param": (
        lambda d: d["defaults"].update(search={"lr": {"type": "float", "low": 0.1, "high": 1}}),
        "defaults", "search.lr", "RunConfig field"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_error_names_file_row_and_field(tmp_path, case):
    mutate, where, field_name, reason = CASES[case]
    data = minimal()
    mutate(data)
    path = write_yaml(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message, message
    assert where in message, message
    if field_name is not None:
        assert f"field '{field_name}'" in message, message
    assert reason in message, message
    assert "\n" not in message


def test_error_gives_the_line_of_the_field(tmp_path):
    data = minimal()
    row(data)["args"]["alpha"] = "big"
    path = write_yaml(tmp_path, data)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "alpha" in text)
    with pytest.raises(ManifestError, match=f"^{path}:{line}: experiment row 2 "):
        load_manifest(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "experiments:\n  - id: t1-ff-bp\n    args: {trainer: bp\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message and "not valid YAML" in message and "line " in message


def test_duplicate_yaml_key_is_an_error(tmp_path):
    text = re.sub(r"( +)alpha: 0.1\n", r"\1alpha: 0.1\n\1alpha: 0.2\n",
                  yaml.safe_dump(minimal(), sort_keys=False))
    assert text.count("alpha") == 2
    path = write_yaml(tmp_path, text)
    with pytest.raises(ManifestError, match=r"t1-ff-lcp-di.*field 'args.alpha'.*given twice"):
        load_manifest(path)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "experiments: []\n", "experiments: 3\n"])
def test_empty_or_shapeless_files(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ManifestError, match=str(path)):
        load_manifest(path)


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_search_spaces_merge_and_normalise(tmp_path):
    data = minimal()
    data["defaults"]["search"] = {
        "meta_lr": {"type": "float", "low": "1e-5", "high": 0.1, "log": True},
        "k_i": {"type": "float", "low": 0.1, "high": 2},
    }
    data["sections"]["MNIST FF"]["search"] = {
        "num_epochs": {"type": "int", "low": 1, "high": 5},
    }
    row(data, 0)["search"] = {"k_i": None}  # BP has no controller: drop it
    row(data)["search"] = {"meta_optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}}
    m = load_manifest(write_yaml(tmp_path, data, "ok.yaml"))
    assert m.get("t1-ff-bp").search == {
        "meta_lr": {"type": "float", "low": 1e-5, "high": 0.1, "log": True},
        "num_epochs": {"type": "int", "low": 1, "high": 5, "log": False},
    }
    assert m.get("t1-ff-lcp-di").search == {
        "meta_lr": {"type": "float", "low": 1e-5, "high": 0.1, "log": True},
        "k_i": {"type": "float", "low": 0.1, "high": 2.0, "log": False},
        "num_epochs": {"type": "int", "low": 1, "high": 5, "log": False},
        "meta_optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    }


def test_row_seeds_override_defaults(tmp_path):
    data = minimal()
    data["defaults"]["seeds"] = [7]
    row(data)["seeds"] = [3, 4]
    m = load_manifest(write_yaml(tmp_path, data, "ok.yaml"))
    assert m.get("t1-ff-bp").seeds == [7]
    assert m.get("t1-ff-lcp-di").seeds == [3, 4]
    data.pop("defaults")
    m = load_manifest(write_yaml(tmp_path, data, "ok2.yaml"))
    assert m.get("t1-ff-bp").seeds == [0, 1, 2]


# ====================================================================== appending rows


def test_append_derived_row_round_trips(tmp_path, manifest):
    path = tmp_path / "experiments.yaml"
    original = MANIFEST.read_text()
    path.write_text(original)
    base = manifest.get("t1-ff-lcp-di")
    new_row = base.derived_row("tuned", parse_overrides(["meta_lr=0.0005", "k_i=0.5"]))
    assert new_row["id"] == "t1-ff-lcp-di-tuned"
    assert new_row["derived_from"] == "t1-ff-lcp-di"
    assert new_row["label"] == "LCP-DI (tuned)"

    exp = write_row(path, new_row, comment="tuned by Optuna (test)")
    text = path.read_text()
    assert text.startswith(original)  # appended: the rest of the file is unchanged
    assert "# tuned by Optuna (test)" in text[len(original):]

    m = load_manifest(path)
    assert m.ids()[-1] == "t1-ff-lcp-di-tuned"
    assert isinstance(exp, Experiment) and exp == m.get("t1-ff-lcp-di-tuned")
    assert (exp.table, exp.section, exp.derived_from) == (1, "MNIST FF", "t1-ff-lcp-di")
    assert exp.seeds == base.seeds
    expected = base.config(seed=1, overrides={"meta_lr": "0.0005", "k_i": "0.5"})
    assert exp.config(seed=1).to_dict() == expected.to_dict()
    # the tuned row does not become a baseline, and the paper rows keep theirs
    assert m.baseline(exp).id == "t1-ff-bp"
    assert m.baseline("t1-ff-bp").id == "t1-ff-bp"
    # a second derived row appends after the first
    second = write_row(path, base.derived_row("tuned2", {"k_i": 0.25}, seeds=[5]))
    assert load_manifest(path).ids()[-2:] == ["t1-ff-lcp-di-tuned", "t1-ff-lcp-di-tuned2"]
    assert second.seeds == [5] and second.args["k_i"] == 0.25


def test_append_rejects_bad_rows_and_leaves_the_file_as_it_was(tmp_path, manifest):
    path = tmp_path / "experiments.yaml"
    path.write_text(MANIFEST.read_text())
    before = path.read_bytes()
    good = manifest.get("t1-ff-lcp-di").derived_row("tuned")

    with pytest.raises(ManifestError, match="already exists"):
        write_row(path, {**good, "id": "t1-ff-lcp-di"})
    bad = copy.deepcopy(good)
    bad["args"]["alpha"] = "big"
    with pytest.raises(ManifestError, match=r"row not added.*t1-ff-lcp-di-tuned.*args.alpha"):
        write_row(path, bad)
    with pytest.raises(ManifestError, match="derived_from"):
        write_row(path, {k: v for k, v in good.items() if k != "derived_from"})
    with pytest.raises(ManifestError, match="suffix"):
        manifest.get("t1-ff-lcp-di").derived_row("Tuned Row")
    assert path.read_bytes() == before


def test_append_keeps_the_blocks_after_experiments(tmp_path):
    data = minimal()
    text = yaml.safe_dump({"experiments": data["experiments"], "sections": data["sections"]},
                          sort_keys=False).replace("sections:", "# the shared flags\nsections:")
    path = write_yaml(tmp_path, text, "ok.yaml")
    base = load_manifest(path).get("t1-ff-lcp-di")
    write_row(path, base.derived_row("tuned"), comment="a tuned row")
    after = path.read_text()
    assert after.endswith(text[text.index("# the shared flags"):])  # comment and block kept
    assert "# a tuned row\n- id: t1-ff-lcp-di-tuned" in after
    assert load_manifest(path).ids()[-1] == "t1-ff-lcp-di-tuned"


def test_append_matches_indentless_rows(tmp_path):
    path = write_yaml(tmp_path, minimal(), "ok.yaml")  # safe_dump writes `- id:` at column 0
    assert "\n- id: t1-ff-bp" in path.read_text()
    base = load_manifest(path).get("t1-ff-lcp-di")
    write_row(path, base.derived_row("tuned"))
    assert load_manifest(path).get("t1-ff-lcp-di-tuned").derived_from == "t1-ff-lcp-di"
