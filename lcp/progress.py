"""A per-epoch progress bar (loss, accuracy, mean solver iterations) as a callback."""

from __future__ import annotations

import sys

from tqdm import tqdm

from lcp.callbacks import Callback


class ProgressBar(Callback):
    def __init__(self, stream=None, disable: bool | None = None):
        self.stream = stream or sys.stderr
        self.disable = disable
        self.bar = None
        self._iters: list[float] = []

    def _open(self, state):
        self.bar = tqdm(total=state.steps_per_epoch, desc=f"epoch {state.epoch + 1}/"
                        f"{state.cfg.num_epochs}", file=self.stream, leave=True,
                        disable=self.disable, dynamic_ncols=True)
        self._iters = []

    def on_step_end(self, state, stats):
        if self.bar is None:
            self._open(state)
        iters = [v for k, v in stats.items() if k.endswith("/iterations") and
                 not k.startswith("free")]
        self._iters.append(iters[0] if iters else stats.get("free/iterations", 0.0))
        post = {"loss": f"{stats.get('loss', float('nan')):.3f}",
                "acc": f"{stats.get('accuracy', float('nan')):.3f}"}
        if any(self._iters):
            post["iters"] = f"{sum(self._iters) / len(self._iters):.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def on_epoch_end(self, state, metrics):
        if self.bar is not None:
            if "eval_test/accuracy" in metrics:
                self.bar.set_postfix_str(
                    f"test acc {metrics['eval_test/accuracy']:.4f}", refresh=True)
            self.bar.close()
            self.bar = None

    def on_exception(self, state, exc):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
