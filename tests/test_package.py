"""The package's import surface: light to import, every public name there, toy folders loadable by stock diffusers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import attnctl


def run_python(code: str) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out.stderr


def test_import_does_not_load_torch_or_diffusers():
    # `attnctl --help` and `import attnctl` stay fast: the public names load on first use.
    code = "import sys, attnctl, attnctl.cli; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    assert run_python(code)[0] == "False False"
    # The stand-in for the toy autoencoder module imports it on first use, by name or by dir().
    code = ("import attnctl.toyworld.autoencoder as a; print('PixelShuffleAutoencoder' in dir(a)); "
            "from attnctl.toyworld.autoencoder import PixelShuffleAutoencoder as P; print(P.__module__)")
    assert run_python(code)[0].split() == ["True", "attnctl.toyworld.autoencoder"]


def test_subcommand_help_does_not_load_torch_or_diffusers():
    # The app callback runs before a subcommand's --help too: it must stay cheap (it imported diffusers and
    # transformers to set their verbosity, ~15 s for `attnctl inspect --help`).
    code = ("import sys\nfrom attnctl.cli import app\ntry:\n    app(['inspect', '--help'], prog_name='attnctl')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(*(m in sys.modules for m in ('torch', 'diffusers', 'transformers')))")
    out = run_python(code)[0].splitlines()
    assert "Usage: attnctl inspect" in "\n".join(out)
    assert out[-1] == "False False False"


def test_every_public_name_resolves():
    for name in attnctl.__all__:
        assert getattr(attnctl, name) is not None
        assert name in dir(attnctl)
    from attnctl import SoftPAG
    from attnctl.controls.softpag import SoftPAG as direct

    assert SoftPAG is direct
    with pytest.raises(AttributeError, match="no attribute 'SoftPag'"):
        attnctl.SoftPag  # noqa: B018


@pytest.mark.parametrize(("model", "pipeline"), [("toy-sd3", "StableDiffusion3Pipeline"), ("toy-flux", "FluxPipeline"),
                                               ("toy-flux-dev", "FluxPipeline")])
def test_stock_diffusers_loads_a_toy_folder_after_import_attnctl(model, pipeline):
    # model_index.json names attnctl.toyworld.autoencoder for the vae; `import attnctl` alone must be enough.
    from attnctl.toyworld.models import resolve_model

    code = (f"import attnctl, diffusers; p = diffusers.{pipeline}.from_pretrained({str(resolve_model(model))!r}); "
            "print(type(p.vae).__module__, type(p.vae).__name__)")
    out, err = run_python(code)
    assert out == "attnctl.toyworld.autoencoder PixelShuffleAutoencoder"
    # diffusers' "Expected types for vae: AutoencoderKL" is a false alarm for the toy vae, and filtered
    assert "Expected types" not in err


def test_a_pipeline_saved_with_the_midpoint_scheduler_loads_back_after_import_attnctl(tmp_path):
    # model_index.json names attnctl.midpoint for the scheduler; `import attnctl` alone must be enough here too.
    from attnctl import FlowMatchMidpointScheduler
    from attnctl.toyworld.models import load_pipeline

    pipe = load_pipeline("toy-sd3")
    pipe.scheduler = FlowMatchMidpointScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "mid")
    code = (f"import attnctl, diffusers; p = diffusers.StableDiffusion3Pipeline.from_pretrained("
            f"{str(tmp_path / 'mid')!r}); print(type(p.scheduler).__name__, p.scheduler.config.shift, "
            "p.scheduler.order)")
    assert run_python(code)[0].split() == ["FlowMatchMidpointScheduler", str(pipe.scheduler.config.shift), "2"]
