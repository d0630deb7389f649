#!/usr/bin/env bash
# Quickstart on a fresh machine (CPU is enough, a few minutes on 2 cores), from the repository root:
#   bash scripts/quickstart.sh
# 1. installs MyMoE with the Hugging Face extra (scripts/setup.sh keeps an installed torch, else installs
#    the CPU build 2.13.0);
# 2. trains a SentencePiece tokenizer on the built-in offline corpus (this Python's standard library
#    sources) and preprocesses it into Megatron .bin/.idx files under data/quickstart/;
# 3. trains configs/tiny.yaml with expert parallelism (EP=2) on 2 local processes with torchrun, which
#    saves a sharded checkpoint under runs/quickstart/checkpoints/, and draws the expert-load heatmap;
# 4. prints a generated sample from the checkpoint;
# 5. runs README's after-training commands on this run: consolidate, export-hf, and transformers loading
#    the export and generating the same greedy tokens as mymoe.
# STEPS=N changes the number of training steps (default 600); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-600}"
DATA=data/quickstart
RUN=runs/quickstart
start=$SECONDS

step() { echo; echo "=== [quickstart] $* (at $((SECONDS - start)) s) ==="; }

step "1/5 install"
PYTHON="$PYTHON" bash scripts/setup.sh hf

step "2/5 tokenizer and indexed dataset from the built-in corpus (builtin:stdlib)"
if [ -f "$DATA/tok.model" ] && [ -f "$DATA/stdlib_train.idx" ] && [ -f "$DATA/stdlib_valid.idx" ]; then
    echo "reusing $DATA/tok.model and $DATA/stdlib_{train,valid}.{bin,idx} (delete $DATA to rebuild)"
else
    mkdir -p "$DATA"
    "$PYTHON" -m data_tools train-tokenizer --input builtin:stdlib --vocab-size 1024 --output "$DATA/tok" --overwrite
    "$PYTHON" -m data_tools preprocess --input builtin:stdlib --tokenizer "$DATA/tok.model" --output "$DATA/stdlib" \
        --split 0.98 --workers 2 --overwrite
fi

step "3/5 train configs/tiny.yaml, EP=2 on 2 processes ($STEPS steps)"
rm -rf "$RUN"  # a fresh run each time (train.resume would otherwise continue the last one)
cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m mymoe.train --config configs/tiny.yaml
     --parallel.expert_parallel_size=2 --train.max_steps="$STEPS" --train.eval_interval=200
     "--data.train_prefixes=[$DATA/stdlib_train]" "--data.valid_prefixes=[$DATA/stdlib_valid]"
     --data.tokenizer="$DATA/tok.model" --train.out_dir="$RUN")
echo "${cmd[*]}"
OMP_NUM_THREADS=1 "${cmd[@]}"
"$PYTHON" -m mymoe.train.heatmap "$RUN/metrics.jsonl" -o "$RUN/expert_load.png"

step "4/5 generate from the checkpoint"
"$PYTHON" -m mymoe.generate --model_path "$RUN/checkpoints" --prompt "def " --max_new_tokens 80 --seed 0

step "5/5 consolidate, export to Hugging Face, generate with transformers"
"$PYTHON" -m mymoe.convert consolidate "$RUN/checkpoints" "$RUN/model.safetensors" --overwrite
"$PYTHON" -m mymoe.convert export-hf "$RUN/checkpoints" "$RUN/hf" --tokenizer "$DATA/tok.model" --overwrite
"$PYTHON" scripts/hf_generate.py "$RUN/hf" --prompt "def " --max-new-tokens 40 --reference "$RUN/checkpoints"

echo
echo "[quickstart] done in $((SECONDS - start)) s: data in $DATA/, checkpoint in $RUN/checkpoints/, TensorBoard logs" \
     "in $RUN/tensorboard/ (tensorboard --logdir $RUN), expert-load heatmap $RUN/expert_load.png," \
     "consolidated weights $RUN/model.safetensors, Hugging Face export $RUN/hf/"
