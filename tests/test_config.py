"""RunConfig: the paper's command-line defaults, types, choices, supported pairs, clear messages."""

import pytest

from lcp.config import ConfigError, RunConfig, parse_bool
from paper_flags import parse_command_line, parse_flags

PAPER_DEFAULTS = dict(
    seed=-1, data="mnist", num_epochs=30, eval_epochs=5, batch_size=64, out_dir="./out",
    save_model=False, solver="vanilla", solver_max_iter=50, solver_error_threshold=1e-4,
    solver_threshold_metric="l2", trainer="lcp-di", k_p=0.0, k_i=1.0, alpha=0.0, dt=1.0,
    tau_v=1.0, tau_u=1.0, tau_e=1.0, rnn_hidden_units=256, timescale_factor=5.0, tau_eps=1.0,
    tau_Q=100.0, sigma=0.1, wd_Q=0.001, kp_wd=0.001, ebd_optim="adam", ebd_lr=0.01,
    ff_init=False, meta_lr=0.001, meta_wd=0.0, meta_optimizer="adam", meta_scheduler="none",
    gamma=0.1, metagrad_clip=-1.0,
)


def test_defaults_are_the_papers():
    cfg = RunConfig(model="ff")
    for name, value in PAPER_DEFAULTS.items():
        assert getattr(cfg, name) == value, name


def test_text_values_are_coerced_like_the_papers_argparse():
    cfg = RunConfig.from_dict({"model": "rnn", "alpha": "0.1", "solver_max_iter": "800",
                               "ff_init": "True", "save_model": "n", "seed": "3"})
    assert cfg.alpha == 0.1 and cfg.solver_max_iter == 800 and cfg.ff_init is True
    assert cfg.save_model is False and cfg.seed == 3
    for text, value in [("yes", True), ("T", True), ("0", False), ("f", False)]:
        assert parse_bool(text) is value


@pytest.mark.parametrize("values,needle", [
    ({"model": "ff", "learning_rate": 1}, "valid settings are"),
    ({"model": "ff", "alpha": "big"}, "'alpha'"),
    ({"model": "ff", "solver_max_iter": "2.5"}, "solver_max_iter"),
    ({"model": "mlp"}, "ff, rnn, conv-ff, conv-rnn"),
    ({"model": "ff", "trainer": "sgd"}, "valid values are"),
    ({"model": "conv-rnn", "trainer": "lcp-kp", "data": "cifar10"}, "supported pairs"),
    ({"model": "conv-rnn", "trainer": "bp", "data": "cifar10"}, "conv-rnn: rbp, lcp-di"),
    ({"model": "conv-ff", "data": "mnist"}, "cifar10"),
    ({"model": "ff", "trainer": "lcp-ebd", "alpha": 0}, "1/alpha"),
    ({"model": "ff", "save_model": "maybe"}, "boolean"),
    ({"model": "ff", "solver": "broyden"}, "vanilla, anderson"),
    ({"model": "ff", "dt": 0}, "'dt'"),
    ({"model": "ff", "validation_split": 1.5}, "validation_split"),
    ({}, "'model' must be given"),
    ({"model": "ff", "controller_solver": "broyden"}, "euler, anderson"),
    ({"model": "ff", "alpha": "nan"}, "'alpha': expected a finite number"),
    ({"model": "ff", "alpha": float("inf")}, "'alpha': expected a finite number"),
    ({"model": "ff", "meta_lr": "-inf"}, "'meta_lr': expected a finite number"),
    ({"model": "ff", "k_i": float("nan")}, "'k_i': expected a finite number"),
    ({"model": "ff", "solver_max_iter": "inf"}, "'solver_max_iter': expected an integer"),
    ({"model": "ff", "limit_train_batches": 0}, "'limit_train_batches' must be ≥ 1, or -1"),
    ({"model": "ff", "limit_eval_batches": "0"}, "'limit_eval_batches' must be ≥ 1, or -1"),
])
def test_bad_settings_are_rejected_with_a_message_that_names_them(values, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        RunConfig.from_dict(values)


def test_config_hash_ignores_where_things_live_but_not_what_is_computed():
    a = RunConfig(model="ff", seed=0)
    assert a.config_hash() == a.replace(data_dir="/elsewhere", device="cpu").config_hash()
    assert a.config_hash() != a.replace(alpha=0.2).config_hash()
    assert a.config_hash() != a.replace(seed=1).config_hash()


def test_paper_flag_form_parses():
    line = ("python3 run_classification.py --data=mnist --meta_lr=0.001 \\\n"
            "--model=ff --trainer=lcp-di --alpha=0.1")
    flags = parse_command_line(line)
    assert flags == {"data": "mnist", "meta_lr": "0.001", "model": "ff", "trainer": "lcp-di",
                     "alpha": "0.1"}
    assert parse_flags(["--k_i", "2"]) == {"k_i": "2"}
    with pytest.raises(ConfigError, match="given twice"):
        parse_flags(["--a=1", "--a=2"])


def _hash_without(cfg: RunConfig, *left_out: str) -> str:
    """The config hash as it was computed before the settings `left_out` existed."""
    import hashlib
    import json

    from lcp.config import NOT_HASHED

    payload = {k: v for k, v in cfg.to_dict().items()
               if k not in NOT_HASHED and k not in left_out + ("skip_limit",)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


@pytest.mark.parametrize("trainer", ["bp", "lcp-di", "lcp-kp", "lcp-ebd"])
def test_lf_noise_leaves_other_trainers_hashes_as_they_were(trainer):
    cfg = RunConfig(model="ff", trainer=trainer, alpha=0.1)
    assert cfg.config_hash() == _hash_without(cfg, "lf_noise")
    assert cfg.replace(lf_noise="paper").config_hash() == cfg.config_hash()


def test_lf_noise_counter_is_another_lcp_lf_computation_and_paper_keeps_the_old_hash():
    paper = RunConfig(model="rnn", trainer="lcp-lf", lf_noise="paper")
    assert paper.config_hash() == _hash_without(paper, "lf_noise")  # earlier lcp-lf runs
    counter = paper.replace(lf_noise="counter")
    assert RunConfig(model="rnn", trainer="lcp-lf").lf_noise == "counter"  # the default
    assert counter.config_hash() != paper.config_hash()


def test_a_bad_lf_noise_is_one_clear_error():
    with pytest.raises(ConfigError, match="lf_noise"):
        RunConfig(model="ff", trainer="lcp-lf", lf_noise="fast")
