"""Data parallelism over processes started by PyTorch's own launcher, torchrun.

    torchrun --standalone --nproc-per-node 2 -m lorafit train ...     # one machine
    lorafit train --nproc 2 ...                                       # the same, started for you

Every process (rank) holds the whole model and the whole data; they differ in which
examples they read. Training: each global batch of the length-bucketed order (the
batch a one-process run would take) is cut into one contiguous share per rank, so the
examples of every optimizer step are those of a one-process run with the same
`--batch-size`, and every rank takes the same number of steps. Evaluation and the
frozen-prefix cache: rank r runs whole batches r, r + world, ... and the rows are
summed across ranks (each row is filled by exactly one rank), so every rank ends with
every row, bit for bit what one process computes for that batch.

Backend gloo on CPU, nccl on CUDA (one GPU per local rank). Only rank 0 writes files
and prints. Outside torchrun (or with one process) every function here is the identity.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from lorafit.errors import LorafitError

TIMEOUT_ENV = "LORAFIT_DIST_TIMEOUT"
"""Seconds a collective may wait for the slowest rank before the job fails (default 600)."""


class DistributedError(LorafitError):
    """A distributed job could not start, or one of its processes failed."""


def launched() -> bool:
    """True in a process that torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the one process that writes files and prints."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init() -> None:
    """Join the job torchrun started (a no-op outside one); this rank's device is `device()`.

    CUDA: backend nccl, the GPU of this local rank; otherwise gloo on the CPU.

    Raises:
        DistributedError: the job asks for more processes per machine than it has GPUs.
    """
    if not launched() or dist.is_initialized():
        return
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    if torch.cuda.is_available():
        if local_rank() >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank()} has no GPU: this machine has "
                                   f"{torch.cuda.device_count()}; pass --nproc-per-node "
                                   f"{torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo", timeout=timeout)


def device() -> torch.device:
    """This rank's device: the GPU of its local rank where there is CUDA, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def share(batch: np.ndarray) -> np.ndarray:
    """This rank's contiguous share of a global batch (B,) -> (B_r,); the shares' sizes
    differ by at most one and may be 0 when the batch has fewer examples than ranks."""
    if world_size() == 1:
        return batch
    return np.array_split(batch, world_size())[rank()]


def my_batches(batches: list[np.ndarray]) -> list[np.ndarray]:
    """The whole batches this rank evaluates: r, r + world, r + 2 world, ..."""
    return batches[rank()::world_size()]


RELEASE_WAIT_S = 10.0
"""The longest `all_reduce` waits for gloo's worker thread to let go of a tensor."""


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """`dist.all_reduce(t, op)` in place, returning only once the backend holds no reference to `t`.

    gloo runs a collective on a worker thread, which marks it complete and only then
    drops its references to the tensor. Where the caller has dropped the tensor first,
    the worker frees it, and a tensor Python has seen needs the GIL to be freed: if the
    interpreter is finalising by then (a rank that has nothing left to do exits at
    once), the worker thread is ended inside C++ and the process aborts with "terminate
    called without an active exception" (rank 1 of a 2-process run, 2 runs of 87 on a
    2-core machine). Waiting here until the tensor's use count is back to
    what it was before the call leaves its last reference with the caller. NCCL keeps
    references for its watchdog instead: the wait is for gloo only.
    """
    before = t._use_count()
    dist.all_reduce(t, op=op)
    if dist.get_backend() == "gloo":
        deadline = time.monotonic() + RELEASE_WAIT_S
        while t._use_count() > before and time.monotonic() < deadline:
            time.sleep(1e-4)
    return t


def sum_(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks, in place (fp32/fp64; gloo has no bf16 all-reduce)."""
    if world_size() > 1:
        all_reduce(t, dist.ReduceOp.SUM)
    return t


def max_(x: float) -> float:
    """The largest `x` over ranks."""
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device())
    all_reduce(t, dist.ReduceOp.MAX)
    return float(t.item())


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Rows filled by exactly one rank each (zeros elsewhere) -> every row, on every rank."""
    if world_size() == 1:
        return rows
    t = torch.from_numpy(np.ascontiguousarray(rows)).to(device())
    return sum_(t).cpu().numpy()


def dropout_seed(seed: int, step: int) -> int:
    """The seed of this rank's dropout draws for optimizer step `step` (several ranks only):
    a function of (seed, step, rank), so a resumed job draws the masks an uninterrupted
    one would without any rank's generator state in the checkpoint."""
    return int(np.random.SeedSequence([seed, step, rank()]).generate_state(1, np.uint64)[0] >> 1)


def launch(argv: list[str], nproc: int) -> int:
    """Run `lorafit <argv>` in `nproc` processes on this machine through torchrun; returns
    its exit status, with a clear message when a process failed.

    torchrun runs in its own session, so a Ctrl-C reaches it once, from here; it passes
    it on to every rank, which checkpoints and stops (exit status 130).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=1", "-m", "lorafit", *argv]
    print(f"lorafit: {nproc} processes: {shlex.join(['torchrun', *cmd[3:]])}", flush=True)
    child = subprocess.Popen(cmd, start_new_session=True)
    stopped: list[int] = []

    def forward(signum, frame) -> None:
        stopped.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:  # torchrun ends with its own error status after passing the signal on
        print("error: interrupted; every process saved its last step's checkpoint and stopped. Continue with: "
              "lorafit train --resume RUN_DIR", file=sys.stderr, flush=True)
        return 130
    if rc not in (0, 2, 130):
        print(f"error: a process of the {nproc}-process job failed (torchrun exit status {rc}; its report above "
              "names the rank and the cause), and the others were stopped. The run folder's last checkpoint is "
              "intact: continue with lorafit train --resume RUN_DIR", file=sys.stderr, flush=True)
    return rc
