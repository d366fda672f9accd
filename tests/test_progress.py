"""Progress that reaches log files: plain lines when the stream is not a terminal."""

from __future__ import annotations

import io
import re

from lcp.config import RunConfig
from lcp.progress import ProgressBar
from lcp.training import fit

LINE = (r"epoch (\d)/2 step (\d)/3 loss \d\.\d{4} acc \d\.\d{4} iters \d+ elapsed \d+m\d\ds "
        r"eta \d+m\d\ds")


def run(mnist_dir, progress) -> list[str]:
    cfg = RunConfig.from_dict(dict(model="ff", trainer="lcp-di", data_dir=str(mnist_dir),
                                   seed=0, num_epochs=2, limit_train_batches=3,
                                   limit_eval_batches=1, eval_epochs=1, rnn_hidden_units=16,
                                   alpha=0.1, solver_max_iter=50, device="cpu", align=False))
    fit(cfg, [progress])
    return progress.stream.getvalue().splitlines()


def test_a_line_per_epoch_when_the_stream_is_a_file(mnist_dir):
    lines = run(mnist_dir, ProgressBar(io.StringIO()))  # StringIO is not a terminal
    assert len(lines) == 2, lines
    for epoch, line in enumerate(lines, 1):
        match = re.fullmatch(LINE + r" test_acc \d\.\d{4}", line)
        assert match and match.groups() == (str(epoch), "3"), line
    assert lines[-1].split(" eta ")[1].startswith("0m00s")


def test_lines_inside_an_epoch_at_the_interval(mnist_dir):
    lines = run(mnist_dir, ProgressBar(io.StringIO(), interval_s=0))  # every step, for the test
    steps = [re.fullmatch(LINE + r"( test_acc .*)?", line).groups()[:2] for line in lines]
    assert steps == [("1", "1"), ("1", "2"), ("1", "3"), ("1", "3"),
                     ("2", "1"), ("2", "2"), ("2", "3"), ("2", "3")]


def test_lcp_train_with_stderr_redirected_writes_plain_lines(mnist_dir, tmp_path):
    from click.testing import CliRunner

    from cli import lcp

    result = CliRunner().invoke(lcp, ["train", "--model=ff", "--trainer=bp", "--num_epochs=2",
                                      f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}",
                                      "--limit_train_batches=3", "--limit_eval_batches=1"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(" step ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "\r" not in result.stderr  # no bar redraws in a file
