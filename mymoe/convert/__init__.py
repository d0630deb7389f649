"""Checkpoint conversion: consolidate, reshard, Hugging Face export and import, Megatron-Core names.

    mymoe-convert consolidate runs/x/checkpoints model.safetensors        # + model.yaml; --weights-only
    mymoe-convert to-sharded model.safetensors runs/y/checkpoints --world-size 4 --expert-parallel-size 4
    mymoe-convert reshard runs/x/checkpoints runs/y/checkpoints --world-size 2 --expert-parallel-size 1
    mymoe-convert export-hf runs/x/checkpoints hf_out/ [--format mixtral|qwen2_moe|deepseek_v3]
    mymoe-convert import-hf hf_dir/ model.safetensors
    mymoe-convert export-megatron runs/x/checkpoints megatron.safetensors

    atomic.py          every output is written under a temporary name and renamed when complete
    state.py           TrainingState: the trainer's checkpoint seam without data or forward passes
    consolidate.py     sharded <-> one safetensors file (weights, optimizer moments, RNG, run state)
    reshard.py         write any source as a sharded checkpoint of a chosen world size and EP size
    hf.py              choose the Hugging Face architecture, write/read config.json + model.safetensors
    hf_mixtral.py, hf_qwen2_moe.py, hf_deepseek_v3.py   per-architecture state-dict adapters and refusals
    megatron_names.py  the state dict under Megatron-Core GPT MoE parameter names
    cli.py             the command line; it loads models through mymoe.load, which sits above this package
"""
