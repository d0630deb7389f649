"""The training job:

    torchrun --nproc_per_node=2 -m mymoe.train --config configs/tiny.yaml [--section.key=value ...]

loop.py wires the parts (model, parallel layout, data reader, optimizer, metrics, checkpoints) into the step
recipe; optim.py is the learning-rate schedule (AdamW and its groups: mymoe/optim.py); metrics.py logs
(progress bar, TensorBoard, JSON lines, expert-health warnings); evaluation.py is the held-out loss
(mymoe-evaluate's too); heatmap.py renders expert load; deepspeed_engine.py is the ``--deepspeed`` path.
What keeps a run from losing work: preflight.py checks every input before any work, lock.py keeps a second
job off out_dir, guard.py skips and stops non-finite steps, stop.py bounds the graceful stop, errors.py
names the errors printed as one line. Launch scripts are in launch/.
"""
