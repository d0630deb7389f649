"""The training job:

    torchrun --nproc_per_node=2 -m mymoe.train --config configs/tiny.yaml [--section.key=value ...]

loop.py wires the parts (model, parallel layout, data reader, optimizer, metrics, checkpoints) into
the step recipe; optim.py is the learning-rate schedule (AdamW and its groups: mymoe/optim.py); metrics.py logs (progress bar, TensorBoard,
JSON lines, expert-health warnings); heatmap.py renders expert load; deepspeed_engine.py is the
``--deepspeed`` path. Launch scripts for every launcher are in launch/.
"""
