"""Several worker processes on one machine: rank, world size and barriers through accelerate's
``PartialState`` (gloo on CPU, nccl on GPU), and a small torchrun-style launcher for ``--processes N``.

Used by ``attnctl batch`` and ``attnctl headhunt``; both also run under ``accelerate launch`` and
``torchrun``, which set the same environment variables.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import AttnCtlError


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class Dist:
    """Rank, world size and barriers: accelerate's PartialState when started by torchrun, accelerate launch
    or ``--processes``; a single process otherwise."""

    def __init__(self, device: str, what: str = "batch"):
        self.what = what
        self.rank, self.world, self.local_rank, self.local_world = 0, 1, 0, 1
        self.state = None
        self.device: str | None = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from datetime import timedelta

            import torch
            from accelerate import PartialState

            cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            # Ranks wait for each other only at the start and the end; the end may be hours apart on GPUs.
            self.state = PartialState(cpu=cpu, timeout=timedelta(days=7))
            self.rank, self.world = self.state.process_index, self.state.num_processes
            self.local_rank = self.state.local_process_index
            self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            dev = self.state.device
            self.device = "cpu" if dev.type == "cpu" else str(dev)

    def barrier(self) -> None:
        if self.state is None:
            return
        try:
            self.state.wait_for_everyone()
        except Exception as e:  # gloo/nccl: a peer process died (killed, crashed)
            raise AttnCtlError(f"rank {self.rank}: another process of this {self.what} ended early "
                               f"({_one_line(e)[:200]})",
                               "finished work is kept; re-run the same command to continue") from e


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Exit code of a worker that ended by an unexpected exception (a bug, out of memory while loading the model, ...),
#: told apart from 1, which a worker returns when some of its images failed.
WORKER_CRASHED = 3
_NORMAL = (0, 1, 130)  # all done · some items failed · interrupted
_WORKER = "import sys; from attnctl.distributed import worker_main; sys.exit(worker_main())"


def worker_main() -> int:
    """Entry point of a ``--processes`` worker: the ``attnctl`` command, except that an unexpected exception
    (after its traceback is printed) ends the worker with ``WORKER_CRASHED`` instead of Python's 1, so that the
    launcher takes it for a crash rather than for "some images failed"."""
    from .cli import main

    try:
        main()
    except Exception:
        sys.excepthook(*sys.exc_info())  # the traceback as usual (torch prefixes each line with the rank)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        return WORKER_CRASHED
    return 0


KEPT = {"batch": "finished images are kept", "headhunt": "the rounds done and candidates scored are kept"}
"""What a command's workers keep when one of them dies, by command (``attnctl batch`` makes images, ``attnctl
headhunt`` scores candidates)."""


def _kept(argv: Sequence[str]) -> str:
    """What the workers running ``attnctl <argv>`` keep when one dies."""
    command = next((a for a in argv if not a.startswith("-")), "")
    return KEPT.get(command, "finished work is kept")


def launch_workers(argv: Sequence[str], processes: int, threads: int | None = None,
                   note: Callable[[str], None] | None = None) -> int:
    """Run ``attnctl <argv>`` (through ``worker_main``) in ``processes`` workers with a torchrun-style
    environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); wait for them. A worker that dies (killed, or
    ended by an unexpected exception: ``WORKER_CRASHED``) takes the others down (they get SIGINT, so they stop
    after their current image) and is named through ``note``. Returns rank 0's exit code, or 1 if a worker died
    (2 only if every failing worker ended with 2); Ctrl-C reaches the workers, which stop cleanly."""
    port = _free_port()
    cpus = os.cpu_count() or 1
    per = threads or max(1, cpus // processes)
    procs: list[subprocess.Popen] = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                   LOCAL_WORLD_SIZE=str(processes), GROUP_RANK="0", ROLE_RANK=str(rank),
                   ROLE_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TORCHELASTIC_RUN_ID="attnctl-batch")
        env.setdefault("OMP_NUM_THREADS", str(per))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, *argv], env=env, stdin=subprocess.DEVNULL))
    stopped: set[int] = set()  # ranks the launcher asked to stop (SIGINT) or killed: not the cause of a failure

    def stop(how: signal.Signals) -> None:
        for rank, p in enumerate(procs):
            if p.poll() is None:
                stopped.add(rank)
                with contextlib.suppress(OSError):
                    p.send_signal(how)

    def forward(signum: int, frame: Any) -> None:  # SIGTERM to the launcher: the workers stop cleanly
        stop(signal.SIGINT)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:  # the workers get the terminal's Ctrl-C themselves; the launcher waits for them
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    crashed: list[tuple[int, int]] = []
    deadline: float | None = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if code is not None and code not in _NORMAL and (rank, code) not in crashed:
                    crashed.append((rank, code))
            if crashed and deadline is None:
                stop(signal.SIGINT)
                deadline = time.monotonic() + 60.0
            if deadline is not None and time.monotonic() > deadline:
                stop(signal.SIGKILL)
            time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for rank, p in enumerate(procs):
        if p.returncode not in _NORMAL and (rank, p.returncode) not in crashed:
            crashed.append((rank, p.returncode))
    if crashed:
        # A worker that died (crashed, or killed by someone else) is the cause: only it is named, and the command
        # exits 1; the others then end with 2 ("another process ended early") or by the launcher's SIGINT / SIGKILL.
        ours = (-signal.SIGINT, -signal.SIGKILL)  # what the launcher itself sends
        died = [(rank, code) for rank, code in crashed
                if code == WORKER_CRASHED or (code < 0 and not (rank in stopped and code in ours))]
        # the ranks that ended on their own (one the launcher stopped while it was still starting is no cause)
        own = [(rank, code) for rank, code in crashed if not (rank in stopped and code in ours)]
        if note is not None:
            for rank, code in died or own or crashed:
                how = (f"was killed by signal {-code}" if code < 0 else
                       "crashed (an unexpected error; its traceback is above)" if code == WORKER_CRASHED else
                       f"exited with code {code}")
                note(f"worker rank {rank} {how}; {_kept(argv)} — re-run the same command to continue")
        codes = {code for _, code in own}
        return 2 if codes == {2} else 1
    codes = [p.returncode for p in procs]
    return 130 if 130 in codes else codes[0]
