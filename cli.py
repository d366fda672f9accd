"""The `lcp` command line: `lcp train` runs one paper command line; the pipeline commands
(list, run-table, run, report, ui, tune) drive the whole tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.scheduling.openmp import wait_as_the_workers_do

# First, before torch (imported below, through lcp) starts OpenMP, which reads how its threads
# wait only then: `lcp train` waits as the pipeline's workers do, unless the user chose.
wait_as_the_workers_do()

from lcp.callbacks import Callback  # noqa: E402
from lcp.config import RunConfig  # noqa: E402
from lcp.errors import DivergenceError, LcpError  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class LcpGroup(click.Group):
    """Turns LcpError into one clear line on stderr and a non-zero exit, without traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DivergenceError as exc:
            click.echo(f"error: diverged: {exc}", err=True)
            sys.exit(EXIT_DIVERGED)
        except LcpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)


@click.group(cls=LcpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lcp")
def lcp() -> None:
    """Least-control principle: trainers and the paper's experiment pipeline."""


def _config_options(func):
    """One `--name=value` option per RunConfig field (the paper's flags and ours)."""
    for name in reversed(RunConfig.field_names()):
        func = click.option(f"--{name}", name, default=None, metavar="VALUE",
                            help=f"(default: {_default_text(name)})")(func)
    return func


def _default_text(name: str) -> str:
    field = RunConfig.__dataclass_fields__[name]
    if field.default_factory is not __import__("dataclasses").MISSING:  # type: ignore[misc]
        return "$LCP_DATA_DIR or ./data" if name == "data_dir" else str(field.default_factory())
    return str(field.default)


@lcp.command(context_settings={"max_content_width": 100})
@_config_options
def train(**flags) -> None:
    """Train one run, with the paper's flags as `--name=value`.

    \b
    Example (Table 1, MNIST FF, LCP-DI):
      lcp train --data=mnist --model=ff --trainer=lcp-di --alpha=0.1 \\
        --solver_error_threshold=1e-06 --solver_max_iter=800 --meta_scheduler=cos
    Quick look: add --num_epochs=1 --limit_train_batches=5 --limit_eval_batches=2
    """
    from lcp.progress import ProgressBar
    from lcp.training import fit

    cfg = RunConfig.from_dict({k: v for k, v in flags.items() if v is not None})
    out_dir = Path(cfg.out_dir)  # created once there is something to write (not on bad data)
    result = fit(cfg, callbacks=[ProgressBar(), _EvalPrinter(), _ModelSaver(cfg, out_dir)])
    epoch = result.epochs_completed - 1
    print(f"Evaluating after training epoch {epoch}")
    for prefix in ("eval_train/", "eval_test/", "eval_val/"):
        keys = [k for k in result.final if k.startswith(prefix)]
        for k in keys:
            print(k, result.final[k])
        if keys:
            print(f"{prefix}epoch", epoch)
    metrics = {"config": cfg.to_dict(), "final": result.final, "history": result.history,
               "stopped_reason": result.stopped_reason}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if cfg.save_model:
        print(f"model saved to {out_dir / 'model.pth'}")


class _EvalPrinter(Callback):
    """Prints the paper's `eval_test/*` lines at every evaluation epoch."""

    def on_epoch_end(self, state, metrics):
        if "eval_test/accuracy" in metrics:
            print(f"Evaluating after training epoch {state.epoch - 1}")
            for k in ("eval_test/loss", "eval_test/accuracy"):
                print(k, metrics[k])
            print("eval_test/epoch", state.epoch - 1)


class _ModelSaver(Callback):
    """`--save_model=True`: the trained model, its trainer state and resolved config."""

    def __init__(self, cfg, out_dir):
        self.cfg, self.out_dir = cfg, out_dir

    def on_fit_end(self, state, result):
        if self.cfg.save_model:
            from lcp.training import save_model_file

            save_model_file(self.out_dir / "model.pth", state)


def _register_pipeline_commands() -> None:
    """The pipeline's commands (list, run-table, run, report, ui, tune) join the group."""
    try:
        from pipeline import commands
    except ModuleNotFoundError as exc:
        if exc.name != "pipeline.commands":  # a real missing dependency, not an absent module
            raise
        return
    commands.register(lcp)


_register_pipeline_commands()


def main(argv=None) -> None:
    lcp.main(args=argv, prog_name="lcp")


if __name__ == "__main__":
    main()
