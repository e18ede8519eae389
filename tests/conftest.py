"""Shared fixtures: tiny pipelines (built once per session) and transformer inputs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests (long training)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def toy_sd3():
    """The shipped toy-sd3 pipeline (loaded once per test module)."""
    from attnctl.toyworld.models import load_pipeline

    return load_pipeline("toy-sd3")


@pytest.fixture(scope="module")
def toy_flux():
    """The shipped toy-flux pipeline (loaded once per test module)."""
    from attnctl.toyworld.models import load_pipeline

    return load_pipeline("toy-flux")


@pytest.fixture(scope="module")
def scene():
    """A 32×32 ground-truth render of "a red circle and a blue square" (the editing tests' real image)."""
    from attnctl.toyworld.world import parse_caption, render, scene_from_item

    caption = "a red circle and a blue square"
    item = {"prompt": caption, **parse_caption(caption), "boxes": [[0.1, 0.1, 0.45, 0.45], [0.55, 0.5, 0.9, 0.85]]}
    return render(scene_from_item(item), 32)


@pytest.fixture(scope="session")
def sd3_pipe():
    from attnctl.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline("sd3")


@pytest.fixture(scope="session")
def sd35_pipe():
    from attnctl.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline("sd35")


@pytest.fixture(scope="session")
def flux_pipe():
    from attnctl.testing import tiny_flux_pipeline

    return tiny_flux_pipeline()


def transformer_inputs(transformer, batch: int = 2, grid: tuple[int, int] = (4, 4), text_len: int = 7,
                       seed: int = 0, dtype=torch.float32) -> dict:
    """Random inputs for an SD3 or FLUX transformer with an image grid of ``grid`` tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    h, w = grid
    if type(transformer).__name__.startswith("SD3"):
        p = cfg.patch_size
        return dict(
            hidden_states=torch.randn(batch, cfg.in_channels, h * p, w * p, generator=g).to(dtype),
            encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(dtype),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
            timestep=torch.rand(batch, generator=g).to(dtype) * 1000,
            return_dict=False,
        )
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    kw = dict(
        hidden_states=torch.randn(batch, h * w, cfg.in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.rand(batch, generator=g).to(dtype),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
    return kw


def ip_adapter_processor(family: str, transformer):
    """A stock diffusers IP-adapter processor for one block of a tiny transformer (random weights, seed 0)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    torch.manual_seed(0)
    tr = transformer
    if family == "sd3":
        return SD3IPAdapterJointAttnProcessor2_0(tr.inner_dim, 16, tr.config.attention_head_dim, 8, scale=0.7)
    return FluxIPAdapterAttnProcessor(tr.inner_dim, 16, num_tokens=(4, 4), scale=[0.6, 0.3])


def batch_row(inputs, i: int, batch: int):
    """Row ``i`` of every per-row entry of transformer inputs (tensors with ``batch`` rows, inside lists and dicts
    too); everything else as it is."""
    if isinstance(inputs, dict):
        return {k: batch_row(v, i, batch) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [batch_row(v, i, batch) for v in inputs]
    if isinstance(inputs, torch.Tensor) and inputs.ndim and inputs.shape[0] == batch:
        return inputs[i : i + 1]
    return inputs


class ScriptServer:
    """The client of tests/script_server.py: runs a script in a forked child of a process that has done the heavy
    imports, and answers like ``subprocess.run(..., capture_output=True, text=True)``."""

    def __init__(self, folder):
        import subprocess
        import sys
        from pathlib import Path

        self.folder = Path(folder)
        self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("script_server.py"))],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.runs = 0

    def run(self, script, args, cwd=None, env=None, timeout: float = 600):
        import json
        import subprocess

        self.runs += 1
        out, err = self.folder / f"{self.runs}.out", self.folder / f"{self.runs}.err"
        request = dict(script=str(script), args=[str(a) for a in args], cwd=str(cwd or os.getcwd()), env=env or {},
                       stdout=str(out), stderr=str(err), timeout=timeout)
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"tests/script_server.py ended (exit code {self.server.wait()}); its stderr is above")
        answer = json.loads(line)
        done = subprocess.CompletedProcess([str(script), *args], answer["returncode"], out.read_text(),
                                           err.read_text())
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(done.args, timeout, done.stdout, done.stderr)
        return done

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="session")
def run_script(tmp_path_factory):
    """``run_script(path, args, cwd=None, env=None, timeout=600)``: the script run as ``python path args…`` would
    run it (its own process, exit code, stdout and stderr), without paying for torch's and diffusers' imports each
    time (tests/script_server.py)."""
    server = ScriptServer(tmp_path_factory.mktemp("scripts"))
    yield server.run
    server.close()
