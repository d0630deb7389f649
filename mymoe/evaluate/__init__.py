"""Loss and perplexity of a checkpoint on held-out data: ``python -m mymoe.evaluate`` (``mymoe-evaluate``).

__main__.py parses the command line without torch (so --help is instant) and checks that every input
exists; run.py loads the model through mymoe.load and scores each dataset with the trainer's own
evaluation math (mymoe/train/evaluation.py).
"""
