"""Ranks agree they were started with the same config, in one fixed-size collective.

Run as the first collective after the process group exists. Its size never depends on the config, so
it cannot hang on a mismatch the way a collective shaped by the config would; every rank sees every
hash and raises the same error naming the ranks that differ.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mymoe.config import Config, ConfigError
from mymoe.parallel.collectives import named_collective


class ConfigMismatchError(ConfigError):
    """Ranks were started with different configs."""


def _mismatch_message(hashes: list[str]) -> str:
    ranks_by_hash: dict[str, list[int]] = {}
    for rank, digest in enumerate(hashes):
        ranks_by_hash.setdefault(digest, []).append(rank)
    differing = [rank for rank, digest in enumerate(hashes) if digest != hashes[0]]
    groups = "; ".join(
        f"hash {digest} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        for digest, ranks in ranks_by_hash.items()
    )
    return (
        f"ranks were started with different configs: rank{'s' if len(differing) > 1 else ''} "
        f"{', '.join(map(str, differing))} differ{'' if len(differing) > 1 else 's'} from rank 0 ({groups}). "
        f"Start every rank with the same config file and the same --section.key overrides."
    )


def agree_on_config(config: Config, device: torch.device, group=None, timeout_seconds: Optional[float] = None) -> None:
    """Raise ConfigMismatchError on every rank when any rank's config hash differs (collective)."""
    mine = torch.tensor(list(bytes.fromhex(config.hash())), dtype=torch.int64, device=device)  # [8]
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    with named_collective("all_gather (config agreement at start-up)", timeout_seconds):
        dist.all_gather(gathered, mine, group=group)
    hashes = [bytes(t.cpu().tolist()).hex() for t in gathered]
    if len(set(hashes)) > 1:
        raise ConfigMismatchError(_mismatch_message(hashes))
