"""MyMoE: distributed expert-parallel Mixture-of-Experts training for PyTorch.

Layout, lowest layer first (tests/test_structure.py holds the order): config.py (typed settings);
model/ (the Transformer and its MoE layer, plain PyTorch) and data/ (indexed-dataset reader); peft.py,
upcycle.py, optim.py (AdamW groups); parallel/ (ranks, process groups, all-to-all dispatch, gradient
reduction); checkpoint/ (sharded storage); convert/ (file formats); load.py (any source -> a model);
the commands: train/, evaluate/, generate.py (its work in inference.py), convert/cli.py, plan.py, verify.py.
"""

__version__ = "0.1.0"
