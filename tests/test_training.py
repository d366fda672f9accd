"""The training loop's kept quirks of the paper's script, checked against hand computations."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lcp.config import RunConfig
from lcp.models import build_model
from lcp.trainers import build_trainer
from lcp.training import evaluate


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
