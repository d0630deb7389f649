"""step_if_finite (mymoe/train/guard.py) is torch's AdamW on a finite step and changes nothing on another."""

from __future__ import annotations

import copy

import torch

from mymoe.config import TrainConfig
from mymoe.optim import build_optimizer, parameter_groups
from mymoe.train.guard import step_if_finite


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    return model, build_optimizer(parameter_groups(model, 0.1), TrainConfig(lr=1e-2))


def _backward(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def _snapshot(model, optimizer):
    return copy.deepcopy(([p.detach() for p in model.parameters()], optimizer.state_dict()["state"]))


def _assert_identical(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for index, state in after[1].items():
        for key, value in state.items():
            # a state a skipped first step created holds AdamW's initial values: step 0, zero moments
            kept = before[1][index][key] if index in before[1] else torch.zeros_like(value)
            assert torch.equal(value, kept), (index, key)


def test_a_finite_step_is_torch_adamw_bit_for_bit_and_a_nonfinite_one_changes_nothing():
    reference, reference_optimizer = _model_and_optimizer()
    guarded, guarded_optimizer = _model_and_optimizer()
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(4, 16, generator=generator)
        _backward(guarded, x)
        if step in (0, 3):  # a skip before the state exists, and one in the middle of the run
            for param in guarded.parameters():
                param.grad[0] = float("nan")
            before = _snapshot(guarded, guarded_optimizer)
            step_if_finite(guarded_optimizer, torch.tensor(False))
            _assert_identical(before, _snapshot(guarded, guarded_optimizer))
            continue
        _backward(reference, x)
        reference_optimizer.step()
        step_if_finite(guarded_optimizer, torch.tensor(True))
        _assert_identical(_snapshot(reference, reference_optimizer), _snapshot(guarded, guarded_optimizer))
