"""A sample-level gated ensemble of trained models (TinySeek's ``gated_TinySeek``): a small gate reads a
sample and routes the whole of it to one or more of several members, whose next-token probabilities are
mixed by the gate's weights.

    gate.py        the gate network (an averaged copy of the members' embeddings, a small Transformer) and
                   the routing rule (softmax, threshold, renormalise)
    model.py       GatedEnsemble: members + gate; the mixed forward, per-member losses, generation
    folder.py      build, save and load an ensemble folder (manifest.json + gate and adapter weights)
    training.py    train the gate: each sample's target is the member with the lowest loss on it
    evaluation.py  per-member and ensemble loss on held-out data, routing accuracy
    cli.py         the command line's parser (no torch), commands.py its work

    python -m mymoe.ensemble build --members runs/code/checkpoints runs/prose/checkpoints --out ens
    python -m mymoe.ensemble train-gate --ensemble ens --data data/code_train data/prose_train --steps 200
    python -m mymoe.ensemble evaluate --ensemble ens --data data/code_valid data/prose_valid --labels 0 1
    python -m mymoe.ensemble generate --ensemble ens --prompt "def main():"

gate.py and model.py are plain PyTorch on one process, next to mymoe.peft; the rest are commands.
"""
