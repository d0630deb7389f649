"""Render expert load over training as a heatmap: one panel per MoE layer, experts x steps, and a last
panel of the busiest rank's expert rows against the mean rank's, per layer (the cost of imbalance under
expert parallelism).

python -m mymoe.train.heatmap runs/tiny/metrics.jsonl -o runs/tiny/expert_load.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np


def read_loads(metrics_path: Path) -> tuple[list[int], np.ndarray, Optional[np.ndarray]]:
    """(steps, loads [steps, layers, experts], rows [steps, layers, ranks] or None for older metrics)."""
    steps, loads, rows = [], [], []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "expert_load" in record:
                steps.append(record["step"])
                loads.append(record["expert_load"])
                rows.append(record.get("expert_rows"))
    if not loads:
        raise SystemExit(f"{metrics_path} holds no expert_load records: was it written by mymoe.train?")
    rows = np.asarray(rows, dtype=np.float64) if all(r is not None for r in rows) else None
    return steps, np.asarray(loads, dtype=np.float64), rows


def render(metrics_path: str, output: str) -> str:
    """Write the heatmap PNG of metrics_path's expert loads to output; returns output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps, loads, rows = read_loads(Path(metrics_path))
    share = loads / np.clip(loads.sum(axis=2, keepdims=True), 1, None)  # fraction of tokens per expert
    num_layers, num_experts = share.shape[1], share.shape[2]
    # one colour scale for every layer, so panels compare; a panel stays readable from 4 to 256 experts
    vmax = max(float(share.max()), 2.0 / num_experts)
    panel_height = min(max(0.18 * num_experts, 1.2), 3.0)
    panels = num_layers + (rows is not None)
    fig, axes = plt.subplots(panels, 1, figsize=(10, 1.0 + panel_height * panels), squeeze=False, sharex=True)
    half_step = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) / 2
    for layer in range(num_layers):
        ax = axes[layer, 0]
        image = ax.imshow(
            share[:, layer, :].T,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0] - half_step, steps[-1] + half_step, num_experts - 0.5, -0.5),
            vmin=0,
            vmax=vmax,
        )
        ax.set_ylabel(f"MoE layer {layer}\nexpert")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_experts, 8)))
    if rows is not None:  # what expert parallelism waits on: the busiest rank's rows against the mean
        ax = axes[-1, 0]
        mean = np.clip(rows.mean(axis=2), 1e-9, None)
        for layer in range(num_layers):
            ax.plot(steps, rows[:, layer, :].max(axis=1) / mean[:, layer], label=f"layer {layer}", linewidth=1)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_ylabel(f"busiest of {rows.shape[2]} ranks'\nexpert rows / mean")
        ax.legend(fontsize="x-small", ncol=min(num_layers, 8), loc="upper right")
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Expert load over training: share of each layer's tokens (uniform = {1 / num_experts:.3f})")
    fig.tight_layout()
    fig.colorbar(image, ax=axes[:num_layers, 0].tolist(), label="token share", fraction=0.03, pad=0.02)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl written by mymoe.train")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: expert_load.png beside the metrics)")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.metrics).with_name("expert_load.png"))
    print(f"wrote {render(args.metrics, output)}")


if __name__ == "__main__":
    main()
