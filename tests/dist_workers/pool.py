"""A persistent pool of ``world`` CPU processes joined in one gloo process group.

Starting a rank costs seconds (importing torch on a shared 2-core machine), so the tests
start one pool per world size and send it scenarios by name (:mod:`dist_workers.scenarios`).
Each rank runs ``scenario(rank, world, **kwargs)`` and returns a picklable value; an
exception on any rank is reported with its traceback. A pool that times out (a rank stuck
in a collective) is killed and marked broken.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import tempfile
import traceback

import torch.multiprocessing as mp

START_TIMEOUT_S = 120.0
# Imported once here before forking, so that the ranks do not each pay for them.
PRELOAD = ("hutchtrace", "hutchtrace.distributed", "scipy.stats", "torch.distributed.tensor",
           "torch.distributed.device_mesh", "torch.distributed.fsdp", "torch.distributed.nn.functional",
           "torch._dynamo", "dist_workers.scenarios")


def _worker(rank: int, world: int, init_method: str, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        results.put((rank, "ready", None))
    except Exception:  # pragma: no cover - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    from dist_workers import scenarios

    while True:
        task = tasks.get()
        if task is None:
            break
        name, kwargs = task
        try:
            out = getattr(scenarios, name)(rank, world, **kwargs)
            results.put((rank, "ok", out))
        except Exception:
            results.put((rank, "error", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:  # pragma: no cover
        pass


class RankError(AssertionError):
    """A scenario raised on some rank; the message holds every failing rank's traceback."""


class Pool:
    def __init__(self, world: int):
        self.world = world
        self.broken = False
        self._dir = tempfile.TemporaryDirectory(prefix="hutchtrace-dist-")
        init = "file://" + os.path.join(self._dir.name, "store")
        # fork: the ranks inherit the imported torch instead of paying seconds to import it
        # again (as DataLoader workers do; each rank sets one intra-op thread first thing).
        for mod in PRELOAD:
            importlib.import_module(mod)
        default = "fork" if sys.platform.startswith("linux") else "spawn"
        method = os.environ.get("HUTCHTRACE_TEST_START", default)
        ctx = mp.get_context(method)
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, init, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self._collect("ready", START_TIMEOUT_S)

    def _collect(self, expect: str, timeout: float) -> list:
        out: list = [None] * self.world
        errors = []
        for _ in range(self.world):
            try:
                rank, status, payload = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close(force=True)
                raise TimeoutError(f"a rank did not answer within {timeout} s (stuck in a collective?)")
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{payload}")
            else:
                out[rank] = payload
        if errors:
            raise RankError("\n".join(errors))
        return out

    def run(self, name: str, timeout: float = 120.0, **kwargs) -> list:
        """Run scenario ``name`` on every rank; the per-rank return values."""
        if self.broken:
            raise RuntimeError("the pool is broken (an earlier scenario timed out)")
        for q in self.tasks:
            q.put((name, kwargs))
        return self._collect("ok", timeout)

    def close(self, force: bool = False) -> None:
        if force:
            self.broken = True
        else:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=2)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._dir.cleanup()
