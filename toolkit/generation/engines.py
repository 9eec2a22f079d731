"""The engines a run can use, checked without importing them: ``local`` (this process, or
torchrun's ranks: `toolkit.generation.run`) and ``ray`` (`toolkit.generation.ray_engine`)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError

if TYPE_CHECKING:
    from toolkit.generation.request import GenerationRequest

ENGINES = ("local", "ray")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise DtkError(
            "--engine ray needs Ray: pip install 'diffusion-toolkit[ray]' (or 'ray[data]')"
        ) from None
    return ray


def check_engine(request: GenerationRequest) -> None:
    """What ``--engine`` can check before the folder is touched."""
    check_engine_options(request.engine, workers=request.workers,
                         ray_address=request.ray_address, threads=request.threads,
                         shard=request.shard)  # fmt: skip


def check_engine_options(engine: str, *, workers: int | None = None,
                         ray_address: str | None = None, threads: int | None = None,
                         shard: Any = None) -> None:  # fmt: skip
    """The engine options (`toolkit.generate`'s) checked together: a run's, or those a
    command such as ``dtk synthesize`` passes on to every run it makes."""
    from toolkit.generation.distributed import torchrun_world

    if engine not in ENGINES:
        raise DtkError(f"unknown --engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise DtkError(f"--threads must be a whole number >= 1, got {threads!r}")
    if engine == "local":
        if workers is not None or ray_address is not None:
            raise DtkError("--workers and --ray-address are for --engine ray")
        return
    if shard is not None:
        raise DtkError("--engine ray spreads the samples itself; leave out --shard")
    if torchrun_world() > 1:
        raise DtkError("--engine ray runs from one process, not under torchrun")
    if workers is not None and workers < 1:
        raise DtkError(f"--workers must be at least 1, got {workers}")
    import_ray()
    if ray_address is not None:
        check_reachable(ray_address)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) where nothing listens, at once: Ray
    itself retries such an address for many minutes before it gives up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto", or a form Ray reads itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise DtkError(
            f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc})"
        ) from None
