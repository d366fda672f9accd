"""Training progress as a callback: a bar on a terminal, plain lines in a log file.

On a terminal, a tqdm bar per epoch (loss, accuracy, mean solver iterations). When the stream is
not a terminal (output sent to a file: nohup, Slurm, the pipeline's worker logs) a bar would be
invisible, so one plain line is written at the end of every epoch and at least every
`interval_s` seconds inside an epoch:

    epoch 3/30 step 450/938 loss 0.3121 acc 0.9052 iters 91 elapsed 1m05s eta 31m10s
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from lcp.callbacks import Callback

DEFAULT_INTERVAL_S = 120.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressBar(Callback):
    """`plain`: None (the default) chooses plain lines when `stream` is not a terminal."""

    def __init__(self, stream=None, plain: bool | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S):
        self.stream = stream or sys.stderr
        if plain is None:
            isatty = getattr(self.stream, "isatty", None)
            plain = not (isatty is not None and isatty())
        self.plain = plain
        self.interval_s = interval_s
        self.bar = None
        self._iters: list[float] = []
        self._last: dict[str, float] = {}
        self._step = 0
        self._t_fit = self._t_line = self._t_epoch = None
        self._steps_timed = 0

    def on_fit_start(self, state):
        self._t_fit = time.monotonic()
        self._steps_timed = 0

    def _open(self, state):
        self._iters, self._step = [], 0
        self._t_epoch = self._t_line = time.monotonic()
        if self._t_fit is None:
            self._t_fit = self._t_epoch
        if not self.plain:
            self.bar = tqdm(total=state.steps_per_epoch, desc=f"epoch {state.epoch + 1}/"
                            f"{state.cfg.num_epochs}", file=self.stream, leave=True,
                            disable=None, dynamic_ncols=True)  # None: silent off a terminal

    def on_step_end(self, state, stats):
        if self._t_epoch is None:
            self._open(state)
        self._step += 1
        self._steps_timed += 1
        iters = [v for k, v in stats.items() if k.endswith("/iterations") and
                 not k.startswith("free")]
        self._iters.append(iters[0] if iters else stats.get("free/iterations", 0.0))
        self._last = {"loss": stats.get("loss", float("nan")),
                      "acc": stats.get("accuracy", float("nan"))}
        if self.bar is not None:
            post = {k: f"{v:.3f}" for k, v in self._last.items()}
            if any(self._iters):
                post["iters"] = f"{self._mean_iters():.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.plain and time.monotonic() - self._t_line >= self.interval_s:
            self._line(state, state.epoch + 1)

    def on_epoch_end(self, state, metrics):
        if self.bar is not None:
            if "eval_test/accuracy" in metrics:
                self.bar.set_postfix_str(
                    f"test acc {metrics['eval_test/accuracy']:.4f}", refresh=True)
            self.bar.close()
            self.bar = None
        elif self.plain and self._t_epoch is not None:
            extra = (f" test_acc {metrics['eval_test/accuracy']:.4f}"
                     if "eval_test/accuracy" in metrics else "")
            self._line(state, state.epoch, extra)
        self._t_epoch = None

    def on_exception(self, state, exc):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _mean_iters(self) -> float:
        return sum(self._iters) / len(self._iters) if self._iters else 0.0

    def _line(self, state, epoch: int, extra: str = "") -> None:
        now = time.monotonic()
        self._t_line = now
        elapsed = now - self._t_fit
        total = state.steps_per_epoch
        remaining = (state.cfg.num_epochs - epoch) * total + (total - self._step)
        eta = elapsed / self._steps_timed * remaining if self._steps_timed else 0.0
        iters = f" iters {self._mean_iters():.0f}" if any(self._iters) else ""
        print(f"epoch {epoch}/{state.cfg.num_epochs} step {self._step}/{total} "
              f"loss {self._last.get('loss', float('nan')):.4f} "
              f"acc {self._last.get('acc', float('nan')):.4f}{iters} "
              f"elapsed {_duration(elapsed)} eta {_duration(eta)}{extra}",
              file=self.stream, flush=True)
