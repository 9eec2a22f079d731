"""``--engine ray``: a plan's samples spread over a Ray Data actor pool.

The driver (the ``dtk generate`` process) claims the folder and lists what is pending, as
the local engine does, and cuts it into chunks: the samples of one shard (the shard size
rounded up to a whole number of batches), or for an imagefolder a few batches. The chunks
become a Ray dataset; ``map_batches`` hands each to one actor of a pool of ``workers``
(`GenerationWorker`: the model loaded once per actor, on the accelerator Ray gives it),
which generates the chunk's batches exactly as the local engine would and writes them from
the worker, into its own part log. The driver merges the logs once the dataset is done.

What makes it safe to kill a worker (Ray restarts the actor and runs its chunk again):

* a chunk's batches are the local engine's batches (same indices, same order), so every
  sample's bytes are the local run's;
* a shard is named for the chunk it holds (its first index and a digest of its indices),
  so a chunk run twice writes the same shard, and a chunk whose shard is already in place
  is skipped: no sample lands in two shards;
* as for every format, a record counts only once its image or shard is in place, so what a
  kill costs is the chunk in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import socket
import sys
import warnings
from typing import TYPE_CHECKING, Any

from toolkit.data.output import Merged, OutputFolder
from toolkit.data.paths import safe_name
from toolkit.errors import DtkError
from toolkit.generation.engines import import_ray

if TYPE_CHECKING:
    import numpy as np

    from toolkit.generation.plan import Plan
    from toolkit.generation.request import GenerationRequest

#: samples per chunk of an imagefolder run, rounded to whole batches
IMAGEFOLDER_CHUNK = 256
#: CPUs Ray reserves for each actor, and torch's threads in it, unless ``--threads`` says:
#: fixed, because on a CPU a convolution's sums (so a sample's bytes) depend on how many
#: threads split them
WORKER_CPUS = 1


def chunk_size(plan: Plan) -> int:
    """Samples per chunk: a shard's worth (or `IMAGEFOLDER_CHUNK`), in whole batches."""
    from toolkit.data.shards import SHARD_SIZE

    batch = plan.settings.batch_size
    want = IMAGEFOLDER_CHUNK
    if plan.request.format != "imagefolder":
        want = plan.request.shard_size or SHARD_SIZE
    return max(1, -(-want // batch)) * batch


def chunk_shard(fmt: str, indices: np.ndarray) -> str | None:
    """The shard a chunk's images go to: named for exactly those indices."""
    from toolkit.data.shards import EXTENSIONS, PREFIX

    if fmt == "imagefolder":
        return None
    digest = hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest()[:12]
    return f"{PREFIX}-ray-{int(indices[0]):09d}-{digest}{EXTENSIONS[fmt]}"


def run_ray(plan: Plan) -> Merged:
    """Generate what `plan` asks for with a Ray actor pool (see the module docstring)."""
    import numpy as np

    from toolkit.generation.record import IDENTITY
    from toolkit.generation.run import _write_grid

    ray = import_ray()
    request = plan.request
    folder = OutputFolder(plan.out)
    with folder.hold("ray-driver", wait=request.wait, split="ray"):
        folder.claim(plan.record, IDENTITY)
        _remove_leftovers(folder)
        done = folder.done(below=plan.samples.n)
        pending = np.fromiter((i for i in range(plan.samples.n) if i not in done), np.int64)
        size = chunk_size(plan)
        chunks = [pending[k : k + size] for k in range(0, len(pending), size)]
        if chunks:
            sigmas = _run_chunks(ray, plan, chunks)
            folder.add_to_run(sigmas=sigmas)
        merged = folder.merge()
    if plan.grid is not None:
        _write_grid(folder, plan)
    return merged


def _run_chunks(ray: Any, plan: Plan, chunks: list[np.ndarray]) -> list[float]:
    """The chunks through the actor pool; returns the sigmas the workers sampled with."""
    request = plan.request
    with _terminal() as terminal:
        started = _start_ray(ray, request)
        try:
            return _stream(ray, plan, chunks, terminal)
        except Exception as exc:
            raise _worker_mistake(exc) or exc from None
        finally:
            # Ray's own exit hook leaves the agents of a local instance running (orphans of
            # every run); a run that started Ray ends it, with the terminal still quiet
            if started:
                ray.shutdown()


def _worker_mistake(exc: Exception) -> DtkError | None:
    """The one-line `DtkError` a worker raised (a data folder it cannot read, say), out of
    the Ray error that carries it back with the worker's traceback; None for other
    errors."""
    found = re.findall(r"toolkit\.errors\.\w*Error: (.+)", str(exc))
    return DtkError(found[-1].strip()) if found else None


@contextlib.contextmanager
def _terminal() -> Any:
    """Ray's C++ core writes its advice straight to file descriptor 2, and its error
    listener retries of worker tasks to descriptor 1 (Ray's log files keep both): while Ray
    runs, both go to /dev/null and dtk's progress bar to a copy of the real stderr.
    Python's errors are raised after they are back."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w")
    with open(os.devnull, "w") as null:
        for fd in saved:
            os.dup2(null.fileno(), fd)
    try:
        yield terminal
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        terminal.close()


def _stream(ray: Any, plan: Plan, chunks: list[np.ndarray], terminal: Any) -> list[float]:
    from tqdm.auto import tqdm

    request = plan.request
    worker_request = _for_workers(plan)
    gpus = 1 if _uses_cuda(request.settings.device) else 0
    workers, threads = request.workers or 1, _worker_threads(request)
    items = ray.data.from_items([{"indices": c} for c in chunks],
                                override_num_blocks=len(chunks))  # fmt: skip
    results = items.map_batches(
        GenerationWorker, batch_size=1, concurrency=workers, num_gpus=gpus,
        num_cpus=threads,
        fn_constructor_kwargs={"request": worker_request, "threads": threads,
                               "directory": os.getcwd()},
    )  # fmt: skip
    sigmas: list[float] = []
    total = sum(len(c) for c in chunks)
    with tqdm(total=total, desc=f"generating ({workers} ray workers)", unit="img",
              file=terminal, disable=not request.progress) as bar:  # fmt: skip
        for batch in results.iter_batches(batch_size=None):
            bar.update(int(batch["count"].sum()))
            sigmas = [float(s) for s in batch["sigmas"][0]]
    return sigmas


def _start_ray(ray: Any, request: GenerationRequest) -> bool:
    """Join the cluster at `ray_address`, or start a local one, quietly; whether this call
    connected (False when this process already was)."""
    if ray.is_initialized():
        return False
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "logging_level": "ERROR"}  # fmt: skip
    if request.ray_address is not None:
        options["address"] = request.ray_address
    else:
        options["num_cpus"] = (request.workers or 1) * _worker_threads(request) + 1  # + driver
    # Ray reports its own progress and advice; dtk's bar and errors are what the user reads
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray\..*")
    try:
        ray.init(**options)
    except Exception as exc:  # an address with no cluster, a refused token, ...: the user's
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if request.ray_address is None:
            raise DtkError(f"--engine ray: cannot start Ray: {reason}") from None
        raise DtkError(
            f"--engine ray: cannot join the Ray cluster at {request.ray_address}: "
            f"{reason} (a cluster with token authentication also needs "
            "RAY_AUTH_MODE=token and its token in this environment)"
        ) from None
    return True


def _worker_threads(request: GenerationRequest) -> int:
    """torch's threads in each actor, and the CPUs Ray reserves for it."""
    return request.threads or WORKER_CPUS


def _uses_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def _for_workers(plan: Plan) -> GenerationRequest:
    """The request as a worker runs it: the local engine, absolute paths (a worker may start
    elsewhere), no grid, no progress bar."""
    request = plan.request
    return dataclasses.replace(request, model=plan.folder.path.resolve(),
                               out=plan.out.resolve(), grid=None, progress=False,
                               engine="local", workers=None, ray_address=None,
                               shard=None)  # fmt: skip


def _remove_leftovers(folder: OutputFolder) -> None:
    """Temporary files of chunk shards a killed worker left (no worker runs yet)."""
    for path in folder.root.glob(".train-ray-*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()


class GenerationWorker:
    """One actor of the pool: the plan made again here and the model loaded once; each call
    generates one chunk into this actor's part log (and the chunk's shard)."""

    def __init__(self, request: GenerationRequest, threads: int, directory: str) -> None:
        import torch

        from toolkit.generation.plan import make_plan
        from toolkit.generation.run import _start

        torch.set_num_threads(threads)
        # a cluster starts its workers in the head's directory: relative paths of the request
        # (a LoRA, a plugin's data) mean what they meant to the driver where it is shared;
        # elsewhere (`ray job submit --working-dir`) the job's own copy is the directory
        if os.path.isdir(directory):
            os.chdir(directory)
        self.plan = make_plan(request)
        self.runner = _start(self.plan)
        self.folder = OutputFolder(self.plan.out)
        self.part = safe_name(f"ray-{socket.gethostname()}-{os.getpid()}")
        # held for the actor's life: the kernel drops the lock when the process dies
        self._held = contextlib.ExitStack()
        self._held.enter_context(self.folder.hold(self.part))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        from toolkit.generation.run import _encode_prompts, _run_batch, _windows

        indices = np.asarray(batch["indices"][0], dtype=np.int64)
        fmt = self.plan.request.format
        shard = chunk_shard(fmt, indices)
        if shard is None or not self.folder.path(shard).is_file():
            with self.folder.part_writer(self.part, fmt, shard=shard) as writer, \
                    torch.inference_mode():  # fmt: skip
                for window in _windows(self.runner, indices.tolist()):
                    _encode_prompts(self.runner, window)
                    for part in window.batches:
                        _run_batch(self.runner, [self.plan.samples[i] for i in part], writer)
        sigmas = [float(s) for s in self.runner.sigmas]
        return {"count": np.array([len(indices)]), "sigmas": np.array([sigmas])}
