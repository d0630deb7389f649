"""Checkpoint conversion: consolidate, reshard, Hugging Face export and import, Megatron-Core names.

mymoe-convert consolidate runs/x/checkpoints model.safetensors        # + model.yaml; --weights-only
mymoe-convert to-sharded model.safetensors runs/y/checkpoints --world-size 4 --expert-parallel-size 4
mymoe-convert reshard runs/x/checkpoints runs/y/checkpoints --world-size 2 --expert-parallel-size 1
mymoe-convert export-hf runs/x/checkpoints hf_out/ [--format mixtral|qwen2_moe|qwen3_moe|olmoe|...]
mymoe-convert import-hf hf_dir/ model.safetensors
mymoe-convert upcycle llama_dir/ moe.safetensors --experts 8 --top-k 2   # + moe.yaml, for --train.init_from
mymoe-convert export-megatron runs/x/checkpoints megatron.safetensors

atomic.py          every output is written under a temporary name and renamed when complete
state.py           TrainingState: the trainer's checkpoint seam without data or forward passes
consolidate.py     sharded <-> one safetensors file (weights, optimizer moments, RNG, run state)
reshard.py         write any source as a sharded checkpoint of a chosen world size and EP size
hf.py              choose the Hugging Face architecture, write/read config.json + model.safetensors
hf_<family>.py     per-architecture state-dict adapters and refusals: mixtral, qwen2_moe, qwen3_moe,
                   olmoe, deepseek_v2, deepseek_v3, and the dense llama, qwen3
megatron_names.py  the state dict under Megatron-Core GPT MoE parameter names
cli.py             the command line; it loads models through mymoe.load, which sits above this package
"""
