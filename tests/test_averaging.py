"""Weight averaging (`train.ema_decay`): the average's maths, its state for --resume, and the
config rule that it needs a selection split to choose among averaged weights."""
import pytest
import torch
from torch import nn

from splitmatch.averaging import WeightAverage, averaged
from splitmatch.config import ConfigError, config_from_dict


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_the_average_follows_the_ema_with_a_short_warm_up():
    model = small_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    expected = start["0.weight"].clone()
    for n in range(200):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model(torch.randn(5, 3))  # moves BatchNorm's running stats and its step counter
        decay = min(0.9, (1 + n) / (10 + n))
        assert average.current_decay() == pytest.approx(decay)
        average.update(model)
        expected = decay * expected + (1 - decay) * model[0].weight
        assert torch.allclose(average.weights["0.weight"], expected, atol=1e-5)
    assert average.updates == 200
    # The step counter is copied, not averaged; the running mean is averaged.
    assert torch.equal(average.weights["1.num_batches_tracked"],
                       model.state_dict()["1.num_batches_tracked"])
    assert not torch.allclose(average.weights["1.running_mean"], model[1].running_mean)
    # It lags the weights it averages: steps of +1 end about 0.9/(1-0.9) = 9 steps behind.
    lag = (model[0].weight - average.weights["0.weight"]).mean().item()
    assert lag == pytest.approx(9.0, abs=0.1)


def test_applied_swaps_the_average_in_and_the_own_weights_back():
    model = small_model()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    own = model[0].weight.clone()
    with averaged(model, average):
        assert torch.equal(model[0].weight, average.weights["0.weight"])
        assert not torch.equal(model[0].weight, own)
    assert torch.equal(model[0].weight, own)
    with averaged(model, None):  # no average kept: the model as it is
        assert torch.equal(model[0].weight, own)
    with pytest.raises(RuntimeError), averaged(model, average):
        raise RuntimeError("an evaluation that fails")
    assert torch.equal(model[0].weight, own)  # put back all the same


def test_the_state_resumes_the_same_average():
    model = small_model()
    average = WeightAverage(model, decay=0.95)
    for _ in range(5):
        with torch.no_grad():
            model[0].bias.add_(0.5)
        average.update(model)
    resumed = WeightAverage(model, decay=0.95, state=average.state_dict())
    assert resumed.updates == 5 and resumed.current_decay() == average.current_decay()
    for both in (average, resumed):
        both.update(model)
    for key, value in average.weights.items():
        assert torch.equal(value, resumed.weights[key]), key
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_averaged_weights_need_a_selection_split():
    with pytest.raises(ConfigError, match="'train.ema_decay' .*'data.select_split' is not set"):
        config_from_dict({"train": {"ema_decay": 0.99}, "data": {"select_split": None}})
    cfg = config_from_dict({"train": {"ema_decay": 0.99},
                           "data": {"select_split": "val", "test_split": "test"}})
    assert cfg.train.ema_decay == 0.99
    assert config_from_dict({}).train.ema_decay == 0.0  # off: the paper's last weights
