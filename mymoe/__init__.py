"""MyMoE: distributed expert-parallel Mixture-of-Experts training for PyTorch.

Layout, lowest layer first (tests/test_structure.py holds the order): config.py (typed settings);
model/ (the Transformer and its MoE layer, plain PyTorch) and data/ (indexed-dataset reader); peft.py,
upcycle.py, optim.py (AdamW groups); parallel/ (ranks, process groups, all-to-all dispatch, gradient
reduction); checkpoint/ (sharded storage); convert/ (file formats); load.py (any source -> a model);
the commands: train/, evaluate/, generate.py (its work in inference.py), convert/cli.py, plan.py, verify.py.

``from mymoe import MoEModelConfig, TransformerForCausalLM``: seed-004's Hugging Face-style names
(docs/seed_api.md).
"""

import importlib

from mymoe.config import MoEModelConfig

__version__ = "0.1.0"
__all__ = ["MoEModelConfig", "TransformerForCausalLM"]


def __getattr__(name: str):
    # the model is loaded on first use (PEP 562): a command's --help, which imports this package, must not
    # pay torch's import (tests/test_cli_startup.py)
    if name == "TransformerForCausalLM":
        return importlib.import_module("mymoe.model.hf_style").TransformerForCausalLM
    raise AttributeError(f"module 'mymoe' has no attribute {name!r}")
