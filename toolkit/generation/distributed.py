"""Which share of the sample indices this process owns: ``--shard K/N`` or torchrun ranks."""

from __future__ import annotations

import dataclasses
import os
import re

from toolkit.errors import DtkError


@dataclasses.dataclass(frozen=True)
class Shard:
    """Process `index` of `count` owns the sample indices ``i`` with ``i % count == index``."""

    index: int = 0
    count: int = 1
    distributed: bool = False  # under torchrun (torch.distributed initialised by us)

    @property
    def name(self) -> str:
        return f"shard-{self.index:04d}-of-{self.count:04d}"

    def owns(self, i: int) -> bool:
        return i % self.count == self.index

    @property
    def is_main(self) -> bool:
        return self.index == 0


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise DtkError(f"--shard must look like K/N (e.g. 0/4), got {text!r}")
    k, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 0 <= k < n:
        raise DtkError(f"--shard {text}: need 0 <= K < N")
    return Shard(k, n)


def torchrun_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def resolve_shard(shard: str | Shard | None, device_type: str) -> Shard:
    """The shard from ``--shard``, else from torchrun's environment, else the whole run."""
    if isinstance(shard, str):
        shard = parse_shard(shard)
    world = torchrun_world()
    if world > 1:
        if shard is not None and shard.count > 1:
            raise DtkError("use --shard or torchrun, not both")
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return Shard(dist.get_rank(), dist.get_world_size(), distributed=True)
    return shard or Shard()


def barrier(shard: Shard) -> None:
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()
