"""The training loop's kept quirks of the paper's script, checked against hand computations."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lcp.callbacks import Callback
from lcp.config import RunConfig
from lcp.errors import DivergenceError
from lcp.models import build_model
from lcp.trainers import build_trainer
from lcp.trainers.backprop import BackpropTrainer
from lcp.training import evaluate, fit, update_norm


def test_evaluation_averages_per_batch_accuracies_and_losses():
    """As the paper's script: the mean over batches, so a last batch of one sample weighs as
    much as a full one (here 0.375, where the mean over samples would be 0.6)."""
    cfg = RunConfig(model="ff", trainer="bp", rnn_hidden_units=16)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, build_model(cfg, (1, 28, 28), 10))
    x = torch.rand(5, 1, 28, 28)
    logits = trainer.predict(x)
    y = logits.argmax(1)
    y[3] = (y[3] + 1) % 10  # one of the first four wrong: accuracy 0.75
    y[4] = (y[4] + 1) % 10  # the last batch's only sample wrong: accuracy 0
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    result = evaluate(trainer, loader, torch.device("cpu"))
    assert result["accuracy"] == pytest.approx(0.375, abs=1e-12)
    per_batch_loss = (F.cross_entropy(logits[:4], y[:4]) + F.cross_entropy(logits[4:], y[4:])) / 2
    assert result["loss"] == pytest.approx(per_batch_loss.item(), rel=1e-6)
    assert result["loss"] != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)


def test_conv_rnn_batchnorms_stay_in_training_mode_during_evaluation():
    """The paper never switches to eval mode: evaluation normalises each batch by its own
    statistics and updates the running ones."""
    cfg = RunConfig(model="conv-rnn", trainer="rbp", data="cifar10", solver_max_iter=20)
    torch.manual_seed(0)
    model = build_model(cfg, (3, 32, 32), 10)
    trainer = build_trainer(cfg, model)
    x = torch.rand(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    norms = [model.encoder[1], model.decoder_norm]
    as_eval = copy.deepcopy(model).eval()
    as_train = copy.deepcopy(model)
    running = [n.running_mean.clone() for n in norms]

    result = evaluate(trainer, [(x, y), (x, y)], torch.device("cpu"))

    assert model.training and all(n.training for n in norms)
    for norm, before in zip(norms, running):
        assert norm.num_batches_tracked.item() == 2  # one update per evaluated batch
        assert not torch.allclose(norm.running_mean, before)
    with torch.no_grad():
        expected = build_trainer(cfg, as_train).predict(x)  # batch statistics, as evaluated
        other = build_trainer(cfg, as_eval).predict(x)  # running statistics
    assert result["loss"] == pytest.approx(F.cross_entropy(expected, y).item(), rel=1e-5)
    assert result["loss"] != pytest.approx(F.cross_entropy(other, y).item(), rel=1e-3)


# ------------------------------------------------------------------ an update too large for float32
def scale_the_update(monkeypatch, factor: float, poison_step: int | None = None):
    """Every update that bp computes, multiplied by `factor` (and, at step `poison_step`, one
    element made NaN): the loop then sees the update of a run that has grown large."""
    original = BackpropTrainer.compute_update
    calls = []

    def compute_update(self, x, y):
        stats = original(self, x, y)
        calls.append(1)
        with torch.no_grad():
            for p in self.model.parameters():
                p.grad.mul_(factor)
            if len(calls) == poison_step:
                next(self.model.parameters()).grad.view(-1)[0] = float("nan")
        return stats

    monkeypatch.setattr(BackpropTrainer, "compute_update", compute_update)


def test_update_norm_is_summed_without_overflow():
    grads = [torch.full((10,), 1e19), torch.full((3, 4), -2e18)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    assert torch.stack([g.norm() for g in grads]).norm().item() == float("inf")  # in float32
    expected = torch.cat([g.double().flatten() for g in grads]).norm().item()  # ~3.24e19
    assert update_norm(params) == pytest.approx(expected, rel=1e-12)
    params[1].grad[1, 2] = float("inf")
    assert update_norm(params) == float("inf")


class RecordSteps(Callback):
    """The weights before training, then per step: the logged update norm, the update as the
    optimizer received it (after clipping) and the weights after the step."""

    def on_fit_start(self, state):
        self.start = [p.detach().clone() for p in state.model.parameters()]
        self.steps = []

    def on_step_end(self, state, stats):
        self.steps.append((stats["update_norm"],
                           [p.grad.clone() for p in state.model.parameters()],
                           [p.detach().clone() for p in state.model.parameters()]))


@pytest.mark.parametrize("clip", [10.0, -1.0])
def test_an_update_whose_float32_norm_overflows_is_clipped_as_the_paper_does(
        monkeypatch, mnist_dir, clip):
    """Every element finite (up to ~1e20), the float32 norm inf: training goes on. With
    clipping, torch's clip_grad_norm_ (the paper's loop) scales such an update by
    max_norm / inf = 0, so Adam's first step leaves the weights where they were; without it,
    Adam moves every weight."""
    scale_the_update(monkeypatch, 1e20)
    record = RecordSteps()
    cfg = RunConfig(model="ff", trainer="bp", rnn_hidden_units=16, data_dir=str(mnist_dir),
                    num_epochs=1, limit_train_batches=1, eval_epochs=0, metagrad_clip=clip,
                    seed=0, device="cpu")
    result = fit(cfg, [record])
    assert result.stopped_reason is None and result.epochs_completed == 1
    (norm, grads, after), = record.steps
    assert 1e19 < norm < float("inf")
    assert all(torch.isfinite(g).all() for g in grads)
    if clip > 0:
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
        assert all(torch.equal(a, b) for a, b in zip(after, record.start))
    else:
        assert all(not torch.equal(a, b) for a, b in zip(after, record.start))


def test_an_update_with_a_non_finite_element_ends_the_run_at_its_step(monkeypatch, mnist_dir):
    """With skipping off (skip_limit=0); with it on, tests/test_skipped_steps.py."""
    scale_the_update(monkeypatch, 1.0, poison_step=3)
    cfg = RunConfig(model="ff", trainer="bp", rnn_hidden_units=16, data_dir=str(mnist_dir),
                    num_epochs=1, eval_epochs=0, seed=0, device="cpu", skip_limit=0)
    with pytest.raises(DivergenceError) as info:
        fit(cfg)
    assert (info.value.phase, info.value.iteration) == ("update", 3)
    assert "at step 3 (epoch 1)" in str(info.value)
