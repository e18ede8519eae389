"""Runs the repository's scripts (examples/, bench/) for the tests, each in its own forked process, with the heavy
imports already done.

A script run as ``python script.py`` spends about 5 of its 6 seconds importing torch, diffusers, transformers and
attnctl. This server imports them once, then for each request forks a child that runs the script as ``__main__``
(``runpy.run_path``, the script's folder first on ``sys.path``, its own argv, working directory, environment and
output files). Every run is still its own process, with its own globals and exit code; only the imports are shared.
The server itself never runs a torch operation, so the children start with no thread pool to inherit.

Protocol: one JSON request per line on stdin (``script``, ``args``, ``cwd``, ``env``, ``stdout``, ``stderr``,
``timeout``), one JSON answer per line on stdout (``returncode``, ``timed_out``). The tests start it through the
``run_script`` fixture (conftest.py); end of stdin ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

PRELOAD = (
    "torch", "numpy", "PIL.Image", "rich.console", "typer", "pydantic", "safetensors.torch",
    "transformers", "diffusers", "attnctl", "attnctl.cli", "attnctl.toyworld.models", "attnctl.toyworld.evaluate",
)
"""Modules every script imports; the lazy ones (diffusers, transformers) get their pipeline classes touched below."""


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import diffusers
    import transformers

    for name in ("StableDiffusion3Pipeline", "FluxPipeline", "SD3Transformer2DModel", "FluxTransformer2DModel",
                 "AutoencoderKL", "FlowMatchEulerDiscreteScheduler"):
        getattr(diffusers, name)
    for name in ("CLIPTextModelWithProjection", "CLIPTokenizer", "T5EncoderModel", "T5TokenizerFast"):
        getattr(transformers, name)


def child(request: dict) -> None:
    """In the forked child: the script as ``python script args…`` would run it; never returns."""
    import runpy
    import traceback

    code = 1
    try:
        fd_in = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd_in, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.chdir(request["cwd"])
        os.environ.update(request.get("env") or {})
        script = os.path.abspath(request["script"])
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:  # sys.exit("message") prints the message and exits 1, as the interpreter does
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - the script's own failure: its traceback, as the interpreter prints it
            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing left to report a failed flush to
                stream.flush()
        os._exit(code & 0xFF)


def wait(pid: int, timeout: float) -> tuple[int, bool]:
    """The child's return code as subprocess reports it (-N for a signal), and whether it was killed for time."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status), True
        time.sleep(0.02)


def main() -> None:
    preload()
    answers = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        answers.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        returncode, timed_out = wait(pid, request.get("timeout", 600))
        answers.write(json.dumps({"returncode": returncode, "timed_out": timed_out}) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
