"""The process group: started by ernie-hal on one machine, or joined under torchrun.

Locally, rank 0 is the calling process: it spawns ranks 1..N-1 as `python -m
ernie_hal.core.parallel.worker` subprocesses (device i for rank i), waits on a TCPStore until each
has connected, watching that none died meanwhile, then all join torch.distributed. A monitor
thread polls the workers: when one exits, the others are ended and the group is marked failed
with the rank and its exit status, so the next (or the blocked) collective raises a clear error
within seconds instead of hanging. Workers watch their parent and exit when it goes.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) every rank
joins through env://; torchrun's agent ends the group when a rank dies.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time

STARTUP_TIMEOUT_S = 300.0         # a worker that has not connected by then ends the launch
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)   # the backstop; a dead peer is seen at once
IDLE_TIMEOUT = datetime.timedelta(days=365)          # followers may wait this long for the next step


class ParallelError(RuntimeError):
    """The tensor-parallel group cannot start or lost a rank."""


def torchrun_env() -> dict | None:
    """rank facts torchrun put in the environment, or None outside torchrun."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return dict(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                    local_rank=int(env.get("LOCAL_RANK", env["RANK"])))
    except ValueError:
        raise ParallelError(f"RANK={env['RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r}: expected integers "
                            f"(set by torchrun)") from None


class RankGroup:
    """This process's place in the group: its rank, the collectives, and (rank 0, local launch)
    the worker processes it watches."""

    def __init__(self, rank: int, world_size: int, local_rank: int, procs=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.procs = procs or {}          # rank -> Popen (local launch, rank 0 only)
        self.failure: str | None = None
        self.control = None               # gloo communicator for step descriptions
        self.closed = False
        self._monitor = None
        self.on_failure = None            # called with the message once a rank is lost (the CLI exits)

    # ---- joining ----------------------------------------------------------------------------
    def init(self, collectives: str, device=None, **kwargs) -> None:
        import torch.distributed as dist
        from ..plugins.communicator import Communicator
        bind_device(device)
        if device is not None and collectives == "nccl":
            kwargs["device_id"] = device      # NCCL's communicator on this rank's device, not device 0
        dist.init_process_group(backend=collectives, rank=self.rank, world_size=self.world_size,
                                timeout=COLLECTIVE_TIMEOUT, **kwargs)
        # steps travel on a CPU group whatever the device; it waits as long as a server idles
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.control = Communicator(self.rank, self.world_size, group=control)
        if self.procs:
            self._monitor = threading.Thread(target=self._watch, name="ernie-hal-tp-monitor", daemon=True)
            self._monitor.start()

    # ---- failures ---------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self.closed:
            for r, p in self.procs.items():
                code = p.poll()
                if code is not None and not self.closed:
                    self.fail(f"tensor-parallel rank {r} (pid {p.pid}) exited with {_status(code)}; "
                              f"the group of {self.world_size} is shut down")
                    return
            time.sleep(0.2)

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            print(f"ernie-hal: {message}", file=sys.stderr, flush=True)
        self._end_workers()
        if self.on_failure is not None:
            self.on_failure(message)

    def error(self, cause: Exception | None = None) -> ParallelError:
        """The error to raise after a collective failed: names the dead rank when known."""
        deadline = time.monotonic() + 3.0     # let the monitor see the exit that broke the collective
        while self.failure is None and self.procs and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.failure is not None:
            return ParallelError(self.failure)
        return ParallelError(f"rank {self.rank}: a collective of the tensor-parallel group failed ({cause}); "
                             f"another rank died or stopped answering")

    def check(self) -> None:
        if self.failure is not None:
            raise ParallelError(self.failure)

    # ---- shutting down ----------------------------------------------------------------------
    def _end_workers(self, grace: float = 2.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self, stop: bool = True) -> None:
        """Rank 0: tell the other ranks to leave (`stop`), reap the workers, end the process group."""
        if self.closed:
            return
        self.closed = True                # first: a worker leaving now is not a failure
        if stop and self.rank == 0 and self.failure is None and self.control is not None:
            try:
                from .step import send_stop
                send_stop(self.control)
            except Exception:
                pass
        deadline = time.monotonic() + 10.0
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._end_workers()
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def bind_device(device) -> None:
    """Make `device` the calling thread's current device where its torch module has one (cuda,
    also for ROCm and CoreX); NCCL and kernels launched from this thread then use it."""
    import torch
    module = getattr(torch, device.type, None) if device is not None and device.type != "cpu" else None
    if module is not None and hasattr(module, "set_device"):
        module.set_device(device)


def _status(code: int) -> str:
    if code < 0:
        import signal
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(world_size: int, collectives: str, worker_args: dict, device=None) -> RankGroup:
    """Rank 0 here; ranks 1..N-1 as subprocesses running core/parallel/worker.py."""
    from torch.distributed import TCPStore
    port = _free_port()
    store = TCPStore("127.0.0.1", port, world_size, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    procs = {}
    pkg = __name__.rsplit(".", 3)[0]          # "ernie_hal"
    for r in range(1, world_size):
        args = dict(worker_args, rank=r, world_size=world_size, port=port, parent=os.getpid(),
                    collectives=collectives)
        procs[r] = subprocess.Popen([sys.executable, "-m", f"{pkg}.core.parallel.worker", json.dumps(args)])
    group = RankGroup(0, world_size, 0, procs)
    try:
        _wait_connected(store, procs)
        group.init(collectives, device=device, store=store)
    except BaseException:
        group._end_workers()
        raise
    return group


def _wait_connected(store, procs) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    waiting = set(procs)
    while waiting:
        for r in sorted(waiting):
            code = procs[r].poll()
            if code is not None:
                raise ParallelError(f"tensor-parallel rank {r} exited with {_status(code)} while starting; "
                                    f"see its messages above")
            if store.check([f"ernie-hal/ready/{r}"]):
                waiting.discard(r)
        if time.monotonic() > deadline:
            raise ParallelError(f"tensor-parallel ranks {sorted(waiting)} did not connect within "
                                f"{STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def join_local(args: dict, device=None) -> RankGroup:
    """A worker's side of launch_local."""
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", args["port"], args["world_size"], is_master=False,
                     timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    store.set(f"ernie-hal/ready/{args['rank']}", "1")
    group = RankGroup(args["rank"], args["world_size"], args["rank"])
    group.init(args["collectives"], device=device, store=store)
    _watch_parent(args["parent"])
    return group


def join_torchrun(env: dict, collectives: str, device=None) -> RankGroup:
    group = RankGroup(env["rank"], env["world_size"], env["local_rank"])
    group.init(collectives, device=device, init_method="env://")
    return group


def _watch_parent(parent: int) -> None:
    """Exit when rank 0's process is gone (its collectives would fail too; this covers idling)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)
    threading.Thread(target=watch, name="ernie-hal-tp-parent", daemon=True).start()
