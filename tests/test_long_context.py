"""A 16K-token forward of a model trained at 512 positions, with YaRN or dynamic NTK scaling, on CPU.

SDPA's causal CPU kernel works on blocks of queries and keys, so memory grows linearly with length: the
full score matrix of one layer here would be 16384^2 * 4 heads * 4 bytes = 4 GiB. The forward runs in a
subprocess so its peak resident memory (ru_maxrss) is its own.
"""

import json
import subprocess
import sys

import pytest

SEQ_LEN = 16384
SCORE_MATRIX_BYTES = SEQ_LEN**2 * 4 * 4

CHILD = r"""
import json, resource, sys, torch
from mymoe.config import ModelConfig, MoEConfig
from mymoe.model.transformer import MoECausalLM

kind, seq_len = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512, rope_scaling={"type": kind, "factor": 32},
                     moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128))
model = MoECausalLM(config).eval()
ids = torch.randint(0, 256, (1, seq_len))
with torch.no_grad():
    prefix_logits = model(ids[:, :512]).logits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logits = model(ids).logits
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "finite": bool(torch.isfinite(logits).all()),
                  "prefix_error": float((logits[:, :512] - prefix_logits).abs().max())}))
"""


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_16k_forward_fits_in_linear_memory(kind):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(SEQ_LEN)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    growth = report["peak"] - report["before"]
    print(
        f"{kind}: peak RSS {report['peak'] / 2**20:.0f} MiB, growth over a 512-token forward {growth / 2**20:.0f} MiB"
    )
    assert report["finite"]
    assert report["peak"] < 8 * 2**30
    assert growth < SCORE_MATRIX_BYTES / 4  # nowhere near one layer's score matrix
    if kind == "yarn":
        # YaRN does not depend on the length, so causality makes the first 512 positions match a short run
        assert report["prefix_error"] < 1e-4
