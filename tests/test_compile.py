"""train.compile: the compiled blocks train to the same losses as eager ones."""

import pytest

from conftest import tiny_config
from mymoe.parallel import ParallelContext
from mymoe.train.compile import compiled_parts
from mymoe.train.loop import Trainer, train


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    moe = {"n_shared_experts": 1}  # the shared experts are compiled too
    eager, compiled = [
        train(
            tiny_config(tmp_path / name, max_steps=2, moe=moe, train={"compile": flag}),
            ParallelContext(),
            progress=False,
        )
        for name, flag in (("eager", False), ("compiled", True))
    ]
    assert len(compiled.losses) == 2
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


def test_compile_wraps_the_dense_parts_and_leaves_the_routed_experts_eager(tmp_path):
    config = tiny_config(tmp_path, max_steps=2, moe={"n_shared_experts": 1}, train={"compile": True})
    trainer = Trainer(config, ParallelContext())
    for block in trainer.model.model.layers:
        parts = compiled_parts(block)
        assert all(part._compiled_call_impl is not None for part in parts)
        if block.is_moe:
            assert block.mlp.experts._compiled_call_impl is None
            assert block.mlp.shared_experts in parts
