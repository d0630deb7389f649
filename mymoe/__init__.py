"""MyMoE: distributed expert-parallel Mixture-of-Experts training for PyTorch.

Layout: config.py (typed settings), model/ (the Transformer and its MoE layer, plain PyTorch),
parallel/ (ranks, process groups, all-to-all dispatch, gradient reduction), data/ (indexed-dataset
reader), train/ (the training loop), checkpoint/ (sharded save, load, conversion), generate.py.
"""
__version__ = "0.1.0"
