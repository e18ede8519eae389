"""The ``attnctl`` command: generate, eval, inspect and toy training.

Every command defaults to the embedded toy model (``--model toy-sd3``); any diffusers pipeline folder or
hub id of an SD3 / SD3.5 / FLUX.1 pipeline works the same way (``--device``, ``--dtype``,
``--attention-backend``, ``--compile``, ``--offload`` for GPUs). Mistakes of the user (a bad control, an unknown model,
words the toy world does not know, an unavailable backend or device) end with one red line naming the
problem and the way out, and exit code 2; ``attnctl --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import importlib.util
import inspect as pyinspect
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .attention_files import check_probes, map_images
from .errors import AttnCtlError
from .sizes import SMALLEST_SIDE
from .toyworld import TOY_MODEL_NAMES, model_record
from .views import images_per_prompt

app = typer.Typer(
    name="attnctl",
    help="Attention controls for SD3, SD3.5 and FLUX.1 diffusers pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
toy_app = typer.Typer(help="The toy shapes world: train the embedded toy models.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")

out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

_STATE = {"debug": False, "app": False}  # app: the command line is running (not a library call of its helpers)
TOY_MODELS = TOY_MODEL_NAMES
_TOYS = ", ".join(TOY_MODELS)
DEFAULT_MODEL = "toy-sd3"
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------------------------- errors


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] [red]{escape(_one_line(message))}[/red]", highlight=False)


def _note(message: str) -> None:
    err_console.print(f"[yellow]{escape(message)}[/yellow]", highlight=False)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
"""A full disk, a quota, a file-size limit."""


def _machine_failure(exc: BaseException) -> AttnCtlError | None:
    """A failure of the machine rather than of the input, as a clear error: a file or folder the command cannot
    read or write, a torch.compile backend that cannot compile here (``None`` for anything else, and without
    importing torch)."""
    if isinstance(exc, OSError) and getattr(exc, "filename", None) is not None and exc.strerror:
        return AttnCtlError(f"{exc.strerror}: {str(exc.filename)!r}",
                            "check the path: its folder must exist (or be creatable) and be writable, and a path "
                            "meant as a folder must not be a file")
    if isinstance(exc, OSError) and exc.errno in _FULL:  # a write or flush: no file name to show
        return AttnCtlError(f"a write failed: {exc.strerror or exc}",
                            "free space on the output disk (or raise the quota or file-size limit), then run the same "
                            "command again: what was written whole is kept and the run resumes")
    if "torch._dynamo" not in sys.modules:
        return None
    from .compiling import backend_failure

    return backend_failure(exc)


def _handles_errors(fn: F) -> F:
    """AttnCtlError (and a torch.compile backend that fails here) → one red line and exit code 2 (the traceback too
    with ``--debug``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AttnCtlError as e:
            if _STATE["debug"]:
                traceback.print_exc()
            _error(str(e))
            raise typer.Exit(2) from None
        except Exception as e:
            failure = _machine_failure(e)
            if failure is None:
                raise
            if _STATE["debug"]:
                traceback.print_exc()
            _error(str(failure))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _error("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library warnings."),
) -> None:
    """Attention controls for SD3, SD3.5 and FLUX.1 diffusers pipelines."""
    _STATE["debug"] = debug
    _STATE["app"] = True
    level = logging.INFO if debug else logging.ERROR
    for name in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(level)
    # Cheap on purpose: `attnctl CMD --help` runs this callback too, and importing diffusers and transformers to set
    # their verbosity took ~15 s. Their environment variables quiet them when (and if) they are imported;
    # _quiet_libraries applies the same where a model loads, and here to those an in-process caller already has.
    verbosity = "info" if debug else "error"
    os.environ.setdefault("DIFFUSERS_VERBOSITY", verbosity)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", verbosity)
    if not debug:  # loading and download bars of the libraries; attnctl shows its own where work is long
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_libraries(load=False)
    if not debug:
        warnings.filterwarnings("ignore", module=r"(diffusers|transformers|torch|accelerate|huggingface_hub)(\.|$)")
        warnings.showwarning = _show_warning  # attnctl's own warnings as one line, not a source location


def _quiet_libraries(load: bool = True) -> None:
    """Set the logging verbosity of diffusers and transformers (info with ``--debug``, else errors only) and, without
    ``--debug``, turn their loading bars off; as the environment variables set by the app callback do at import, but
    also for a library imported before (the callback's variables come too late for it) and for diffusers' loading
    bar, which no variable controls. ``load=False`` touches only the libraries already imported (cheap). Only for
    the command line: a script calling :func:`load_pipeline` or ``run_batch`` keeps its own logging settings."""
    if not _STATE["app"]:
        return
    debug = _STATE["debug"]
    for lib in ("diffusers", "transformers"):
        if not load and lib not in sys.modules:
            continue
        try:
            log = importlib.import_module(f"{lib}.utils.logging")
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        (log.set_verbosity_info if debug else log.set_verbosity_error)()
        if not debug:
            log.disable_progress_bar()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A warning as the CLI shows it without ``--debug``: ``warning: <message>`` on stderr."""
    err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)


def main() -> None:
    """Entry point of ``python -m attnctl``."""
    app(prog_name="attnctl")


# ---------------------------------------------------------------------------------------------- inputs


def read_json_arg(text: str, what: str, example: str = '{"kind": "probe", "words": ["circle"]}',
                  kind: str = "a JSON object") -> Any:
    """Parse a JSON argument given inline or as ``@file``, naming ``what`` in errors (and ``kind`` and ``example``
    in the way out)."""
    source = "inline"
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise AttnCtlError(f"{what}: cannot read {str(path)!r} ({e.strerror or e})",
                               "pass an existing JSON file as @path or the JSON itself") from None
        except UnicodeDecodeError as e:  # an image or other binary file under a .json name
            raise AttnCtlError(f"{what}: {str(path)!r} is not a UTF-8 JSON text file (byte {e.start} is not UTF-8)",
                               f"give {kind} saved as UTF-8 text, e.g. '{example}'") from None
        source = str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        shown = text if len(text) <= 60 else text[:57] + "..."
        where = "" if source == "inline" else f" in {source}"
        raise AttnCtlError(
            f"{what} is not valid JSON{where} ({e.msg} at line {e.lineno} column {e.colno}): {shown!r}",
            f"write {kind}, e.g. '{example}'" + (", or @file.json" if source == "inline" else ""),
        ) from None


def build_controls(specs: Sequence[Any], what: str = "control") -> list:
    """Controls from JSON objects (lists of objects are flattened) via ``control_from_json``."""
    from .controls import control_from_json

    flat: list[Any] = []
    for spec in specs:
        flat.extend(spec if isinstance(spec, list) else [spec])
    controls = []
    for i, data in enumerate(flat):
        label = f"{what} #{i + 1}" if len(flat) > 1 else what
        if not isinstance(data, dict):
            raise AttnCtlError(f"{label} is {type(data).__name__} {data!r}, not a JSON object",
                               'write an object with a "kind", e.g. {"kind": "probe", "words": ["circle"]}')
        try:
            controls.append(control_from_json(data))
        except AttnCtlError as e:
            raise type(e)(f"{label}: {e}") from e
    return controls


def parse_dtype(name: str):
    import torch

    key = DTYPES.get(name.lower())
    if key is None:
        raise AttnCtlError(f"unknown dtype {name!r}", "use fp32, fp16 or bf16")
    return getattr(torch, key)


def check_device(device: str):
    """A ``torch.device`` that exists on this machine, or a clear error."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AttnCtlError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
            raise AttnCtlError(f"device {device!r} is not available: this machine has no usable CUDA GPU "
                               f"(torch {torch.__version__}, built {built})", "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise AttnCtlError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)",
                               f"use cuda:0 .. cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise AttnCtlError(f"device {device!r} is not available on this machine", "use --device cpu")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise AttnCtlError(f"device {device!r} is not available on this machine", "use --device cpu")
    return dev


# ---------------------------------------------------------------------------------------------- models


def _models_module():
    """``attnctl.toyworld.models`` when it is installed (it resolves toy names), else ``None``."""
    if importlib.util.find_spec("attnctl.toyworld.models") is None:
        return None
    return importlib.import_module("attnctl.toyworld.models")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or Path(name).suffix != "" or name.count("/") > 1


def resolve_model(name: str) -> str:
    """A local folder or a hub id for ``name`` (toy names → the shipped folders), or a clear error."""
    models = _models_module()
    if models is not None and hasattr(models, "resolve_model"):
        return str(models.resolve_model(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise AttnCtlError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)",
                               "pass a folder written by save_pretrained, a hub id, or " + " / ".join(TOY_MODELS))
        return str(path.resolve())
    if name in TOY_MODELS:
        raise AttnCtlError(f"the toy model {name!r} is not installed with this attnctl",
                           "pass a diffusers pipeline folder with --model PATH")
    if _looks_like_path(name) or "/" not in name:
        raise AttnCtlError(
            f"unknown model {name!r}: not a toy model ({', '.join(TOY_MODELS)}), not an existing folder, "
            "and not a hub id",
            f"pass {', '.join(TOY_MODELS)}, a diffusers pipeline folder, or a hub id such as owner/name",
        )
    return name


def _pipeline_class(location: str):
    from diffusers import DiffusionPipeline

    from .pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline

    try:
        index = DiffusionPipeline.load_config(location)
    except (OSError, ValueError) as e:
        raise AttnCtlError(f"cannot read the pipeline index of {location!r}: {_one_line(e)[:300]}",
                           "check the model name or folder (and the network, for a hub id)") from None
    cls = str(index.get("_class_name", ""))
    if "Flux" in cls:
        return AttnCtlFluxPipeline
    if "StableDiffusion3" in cls:
        return AttnCtlSD3Pipeline
    raise AttnCtlError(f"{location!r} is a {cls or 'unknown'} pipeline",
                       "attnctl works with SD3, SD3.5 (StableDiffusion3Pipeline) and FLUX.1 (FluxPipeline)")


def load_pipeline(name: str, device: str = "cpu", dtype=None):
    """An attnctl pipeline for ``name`` on ``device`` in ``dtype`` (toy names, folders and hub ids)."""
    import torch

    _quiet_libraries()
    dtype = dtype or torch.float32
    models = _models_module()
    if models is not None and hasattr(models, "load_pipeline"):
        try:
            return models.load_pipeline(name, device=device, dtype=dtype, controlled=True)
        except AttnCtlError:
            raise
        except OSError as e:
            raise AttnCtlError(f"cannot load model {name!r}: {_one_line(e)[:300]}",
                               "check the model name or folder (and the network, for a hub id)") from e
    import attnctl.toyworld.autoencoder  # noqa: F401  (diffusers finds the toy vae class in sys.modules)

    location = resolve_model(name)
    cls = _pipeline_class(location)
    try:
        pipe = cls.from_pretrained(location, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise AttnCtlError(f"cannot load model {name!r}: {_one_line(e)[:300]}",
                           "check that the folder is a complete diffusers pipeline") from e
    return pipe.to(device)


def is_toy_pipeline(pipe) -> bool:
    """Whether the pipeline reads prompts with the shapes-world tokenizer (toy and tiny test models)."""
    from .toyworld import vocab

    tok = getattr(pipe, "tokenizer", None)
    if tok is None or not hasattr(tok, "get_vocab"):
        return False
    try:
        return tok.get_vocab() == vocab.vocabulary()
    except Exception:  # noqa: BLE001 - an exotic tokenizer is simply not the toy one
        return False


def check_vocabulary(pipe, prompts: Sequence[str], model: str) -> None:
    """On a toy model, refuse prompts with unknown words (naming them) or too many words."""
    if not is_toy_pipeline(pipe):
        return
    from .toyworld import vocab
    from .toyworld.tokenizer import split_words, unknown_words

    prompts = [p for p in prompts if p]
    bad = unknown_words(prompts)
    if bad:
        raise AttnCtlError(
            f"words outside the vocabulary of the toy model {model}: {', '.join(repr(w) for w in bad)}",
            f"use only the words the shapes world knows: {' '.join(vocab.words())}",
        )
    limit = int(getattr(pipe.tokenizer, "model_max_length", 0) or 0) - 2
    for p in prompts:
        n = len(split_words(p))
        if 0 < limit < n:
            raise AttnCtlError(f"the prompt {p!r} has {n} words; the toy model {model} reads at most {limit}",
                               "shorten the prompt")


def _diffusers_call(pipe) -> Callable:
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers.") and "__call__" in vars(cls):
            return vars(cls)["__call__"]
    return type(pipe).__call__


def call_defaults(pipe) -> dict[str, Any]:
    """Default steps, guidance, size and T5 length of a pipeline (toy models: their trained settings)."""
    from .sites import family_of

    params = pyinspect.signature(_diffusers_call(pipe)).parameters

    def default(name: str, fallback: Any) -> Any:
        p = params.get(name)
        return fallback if p is None or p.default is pyinspect.Parameter.empty else p.default

    side = int(getattr(pipe, "default_sample_size", 64)) * int(getattr(pipe, "vae_scale_factor", 8))
    family = family_of(pipe.transformer)
    t5 = getattr(pipe, "tokenizer_3" if family == "sd3" else "tokenizer_2", None)
    seq = int(default("max_sequence_length", 256))
    limit = getattr(t5, "model_max_length", None)
    if isinstance(limit, int) and limit < seq:
        seq = limit
    out = {"steps": int(default("num_inference_steps", 28)), "guidance": float(default("guidance_scale", 7.0)),
           "height": side, "width": side, "max_sequence_length": seq}
    if is_toy_pipeline(pipe):
        out.update(height=32, width=32, steps=20)
    models = _models_module()
    if models is not None and hasattr(models, "default_call_kwargs"):
        names = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
        for k, v in (models.default_call_kwargs(pipe) or {}).items():
            out[names.get(k, k)] = v
    return out


def gradient_controls(controls: Sequence[Any]) -> list[str]:
    """The kinds of the controls that take gradients through the transformer (layout guidance, UnifyEdit: the
    ``latent_guidance`` ones), whose run needs the attention backend's backward too."""
    return [str(c.kind) for c in controls if getattr(c, "latent_guidance", False)]


def set_attention_backend(pipe, backend: str, device, dtype, gradients: Sequence[str] = ()) -> str:
    """Set a diffusers attention backend and prove it runs here; an unavailable one is a clear error.

    ``gradients``: the kinds of the run's controls that take gradients (:func:`gradient_controls`); with any, a
    backward through the backend is proved too, as some run forward only on a device (FlexAttention on CPU) and
    would otherwise fail deep inside the first gradient pass."""
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    names = [b.value for b in AttentionBackendName]
    name = backend.strip().lower()
    if name not in names:
        public = ", ".join(n for n in names if not n.startswith("_"))
        raise AttnCtlError(f"unknown attention backend {backend!r}", f"use one of diffusers' backends: {public}")
    try:
        pipe.transformer.set_attention_backend(name)
    except Exception as e:  # diffusers raises RuntimeError/ImportError/ValueError for what is missing
        raise AttnCtlError(f"attention backend {name!r} is not available here: {_one_line(e)[:300]}",
                           "install the package it names (xformers: pip install 'attnctl[xformers]'), "
                           "or use --attention-backend native") from e
    where = f"on {device} in {DTYPE_NAMES.get(str(dtype)[6:], dtype)}"
    q = torch.randn(1, 8, 2, 16, device=device, dtype=dtype)
    try:
        dispatch_attention_fn(q, q, q, backend=AttentionBackendName(name))
    except Exception as e:  # noqa: BLE001 - any failure of the probe means the backend cannot run here
        pipe.transformer.set_attention_backend("native")
        raise AttnCtlError(
            f"attention backend {name!r} does not run {where}: {_one_line(e)[:300]}",
            "use --attention-backend native, or a device and dtype the backend supports",
        ) from e
    if gradients:
        q = q.detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                dispatch_attention_fn(q, q, q, backend=AttentionBackendName(name)).float().sum().backward()
        except Exception as e:  # noqa: BLE001 - the gradient pass would fail the same way, mid-run
            pipe.transformer.set_attention_backend("native")
            kinds = ", ".join(dict.fromkeys(gradients))
            raise AttnCtlError(
                f"attention backend {name!r} runs {where} but cannot take the gradients that {kinds} needs: "
                f"{_one_line(e)[:300]}",
                "use --attention-backend native (or leave the option out), or a device the backend supports "
                "backward on",
            ) from e
    return name


COMPILE_HELP = ("Compile the transformer in place with torch.compile and this backend (inductor on a GPU; 'eager' "
                "traces without code generation).")


def check_compile_backend(backend: str) -> str:
    """A torch.compile backend name dynamo knows (its debug backends ``eager`` and ``aot_eager`` included); an
    unknown one is a clear error, before any model is loaded."""
    import torch._dynamo

    names = torch._dynamo.list_backends(exclude_tags=())
    name = backend.strip()
    if name not in names and name.lower() in names:
        name = name.lower()
    if name not in names:
        usual = [n for n in ("inductor", "eager", "aot_eager") if n in names]
        usual += [n for n in torch._dynamo.list_backends() if n not in usual]
        raise AttnCtlError(f"unknown torch.compile backend {backend!r}",
                           f"use one of torch._dynamo.list_backends(): {', '.join(usual)} (inductor on a GPU; "
                           "eager traces without code generation)")
    return name


def compile_transformer(pipe, backend: str) -> str:
    """Compile ``pipe.transformer`` in place (``transformer.compile(backend=...)``); the controls stay eager inside
    it (attnctl.compiling), so the images are the uncompiled model's (bit for bit under dynamo's ``eager`` backend).
    Returns the backend's name."""
    name = check_compile_backend(backend)
    pipe.transformer.compile(backend=name)
    return name



def check_scales(guidance: float | None, true_cfg: float | None = None) -> None:
    """``--guidance`` a finite scale of 0 or more, ``--true-cfg`` a finite one above 1 (where true CFG acts): the
    rules batch files follow."""
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise AttnCtlError(f"--guidance {guidance} is not a guidance scale",
                           "give a finite number of 0 or more (1 or less: no CFG on SD3)")
    if true_cfg is not None and not (math.isfinite(true_cfg) and true_cfg > 1):
        raise AttnCtlError(f"--true-cfg {true_cfg} does not turn true CFG on (it acts above 1)",
                           "give a finite scale above 1, such as 4, or leave --true-cfg out")


def check_negative(family: str, negative_prompt: str | None, guidance: float | None, true_cfg: float | None,
                   names: tuple[str, str, str] = ("--negative-prompt", "--guidance", "--true-cfg")) -> None:
    """Refuse guidance settings a run would silently ignore: ``true_cfg`` on SD3, a FLUX negative prompt without
    true CFG, an SD3 negative prompt with CFG off (``guidance`` ≤ 1; ``None``: the model's default). ``names``:
    what the user calls the negative prompt, guidance and true CFG (options or batch fields). The scales' own
    ranges are :func:`check_scales`' (and a batch file's schema's)."""
    neg, g, t = names
    if true_cfg is not None and family != "flux":
        raise AttnCtlError(f"{t} is for FLUX models", f"use {g} for SD3 / SD3.5 models")
    if negative_prompt and family == "flux" and true_cfg is None:
        raise AttnCtlError(f"{neg} on a FLUX model acts only through true CFG, which is off",
                           f"add {t} 4 (any scale > 1), or leave {neg} out")
    if negative_prompt and family != "flux" and guidance is not None and guidance <= 1:
        raise AttnCtlError(f"{neg} acts through CFG, which {g} {guidance} turns off (it acts above 1)",
                           f"give {g} > 1, or leave {neg} out")


def check_size(pipe: Any, height: int | None, width: int | None, names: tuple[str, str] = ("--height", "--width")
               ) -> None:
    """Refuse a side that is not a multiple of what the model needs (:func:`attnctl.sizes.size_multiple`: SD3
    refuses it from deep inside the call, FLUX silently rounds it down) or past the side its position table covers
    (SD3; :func:`attnctl.sizes.largest_side`). Said in pixels, with the nearest sizes that work. ``pipe`` may be
    a :class:`~attnctl.skeleton.PipelineSkeleton`; a side given as ``None`` (the model's default) is not checked."""
    from .sizes import largest_side, size_multiple

    m, top = size_multiple(pipe), largest_side(pipe)
    for name, side in zip(names, (height, width), strict=True):
        if side is None:
            continue
        if top is not None and side > top:
            raise AttnCtlError(f"{name} {side} is past this model's largest side, {top} px (its position table)",
                               f"give {name} {top} or less")
        if side % m:
            below, above = side - side % m, side - side % m + m
            near = f"{below} or {above}" if below >= m and (top is None or above <= top) else str(max(below, m))
            raise AttnCtlError(f"{name} {side} is not a multiple of {m} px, which this model's image sides must be",
                               f"give {name} {near}")


def guidance_acts(transformer: Any) -> bool:
    """Whether a pipeline's ``guidance_scale`` does anything: not on a FLUX model whose transformer has no guidance
    embedding (FLUX.1-schnell, toy-flux), where diffusers ignores it."""
    from .sites import family_of

    return family_of(transformer) != "flux" or bool(transformer.config.get("guidance_embeds"))


def check_guidance_used(transformer: Any, guidance: float | None,
                        names: tuple[str, str | None] = ("--guidance", "--true-cfg")) -> None:
    """Refuse a guidance scale given for a FLUX model whose transformer takes none (no guidance embedding, as
    FLUX.1-schnell and toy-flux): diffusers ignores it there. ``names``: the guidance and true-CFG settings as the user
    writes them (``None``: the command has no true CFG, as ``edit``)."""
    if guidance is not None and not guidance_acts(transformer):
        cfg = f"; for classifier-free guidance give {names[1]} (a scale above 1)" if names[1] else ""
        raise AttnCtlError(f"{names[0]} does nothing on this FLUX model: its transformer takes no guidance value (it "
                           "has no guidance embedding)", f"leave {names[0]} out{cfg}")


_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative_prompt": (str, type(None)), "model": (str,), "dtype": (str, type(None)),
    "seed": (int,), "steps": (int,), "height": (int,), "width": (int,), "max_sequence_length": (int,),
    "images": (int, type(None)), "guidance": (int, float), "true_cfg": (int, float, type(None)),
    "controls": (list, type(None)), "reference_prompts": (list, type(None)),
}


def _checked_settings(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """A PNG's recorded settings, each of the type ``generate`` reads it as (a hand-edited file may say otherwise)."""
    for key, types in _SETTING_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or isinstance(value, bool)):
            raise AttnCtlError(f"{str(path)!r} records {key} = {json.dumps(value)[:60]}, which is not "
                               f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}",
                               f"fix {key} in the PNG's attnctl metadata, or give every setting as options, without "
                               "--from")
    return meta


# ---------------------------------------------------------------------------------------------- generate


@app.command()
@_handles_errors
def generate(
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="The prompt (required unless --from)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help=f"{_TOYS}, a pipeline folder or a hub id (default: {DEFAULT_MODEL})"),
    seed: int | None = typer.Option(None, "--seed", "-s", min=0, max=2**63 - 1,
                                    help="Seed of the initial noise (default: 0)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Denoising steps (default: the model's)."),
    guidance: float | None = typer.Option(None, "--guidance", "-g",
                                          help="Guidance scale (default: the model's)."),
    true_cfg: float | None = typer.Option(None, "--true-cfg",
                                          help="FLUX only: true classifier-free guidance scale (> 1), against "
                                               "--negative-prompt (default: the empty prompt)."),
    height: int | None = typer.Option(None, "--height", min=SMALLEST_SIDE, help="Image height in pixels."),
    width: int | None = typer.Option(None, "--width", min=SMALLEST_SIDE, help="Image width in pixels."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", "-n", help="Negative prompt."),
    control: list[str] | None = typer.Option(
        None, "--control", "-c",
        help='A control as JSON or @file.json, e.g. \'{"kind": "probe", "words": ["circle"]}\'; repeatable.',
    ),
    out: Path = typer.Option(Path("out/image.png"), "--out", "-o", help="Output PNG (written atomically)."),
    images: int | None = typer.Option(
        None, "--images", min=1, help="Images of the prompt in one call (num_images_per_prompt), written as OUT-0.png, "
                                      "OUT-1.png, ... (default: an epipolar control's views, else 1)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: fp32)."),
    attention_backend: str | None = typer.Option(
        None, "--attention-backend", help="diffusers attention backend: native, xformers, flash, ..."),
    compile_backend: str | None = typer.Option(None, "--compile", help=COMPILE_HELP),
    offload: bool = typer.Option(False, "--offload", help="Model CPU offload for small GPUs (ignored on CPU)."),
    from_: Path | None = typer.Option(
        None, "--from", help="Regenerate from a PNG written by attnctl: its settings are the defaults."),
    reference_prompt: list[str] | None = typer.Option(
        None, "--reference-prompt", "-r",
        help="Reposition: the prompt of subject k's reference image, made in the same call for an isolation control "
             "with references=true; one per subject, in the subjects' order (written as OUT-ref1.png, ...). "
             "Without that control the set is made plainly, from the same noise (the baseline)."),
) -> None:
    """Generate one image and write it as a PNG that records how it was made."""
    import torch

    meta_in: dict[str, Any] = {}
    if from_ is not None:
        from .imageio import read_metadata

        meta_in = _checked_settings(read_metadata(from_), from_)
        if "edited_from" in meta_in:
            raise AttnCtlError(f"{str(from_)!r} is an edit of {meta_in['edited_from']!r}, not a generated image",
                               "edit it again with attnctl edit IMAGE --source ... --target ... (its source_prompt "
                               "and prompt are in the PNG's metadata)")
    prompt = prompt if prompt is not None else meta_in.get("prompt")
    if prompt is None:
        raise AttnCtlError("no prompt given", "pass --prompt TEXT, or --from IMAGE.png to regenerate an image")
    if true_cfg is None:
        true_cfg = meta_in.get("true_cfg")
    check_scales(guidance if guidance is not None else meta_in.get("guidance"), true_cfg)  # given or recorded
    model = model or meta_in.get("model") or DEFAULT_MODEL
    seed = seed if seed is not None else int(meta_in.get("seed", 0))
    if negative_prompt is None:
        negative_prompt = meta_in.get("negative_prompt")
    # Controls given on the command line replace the ones recorded in --from.
    specs = [read_json_arg(c, "--control") for c in control] if control else [meta_in.get("controls") or []]
    controls = build_controls(specs, what="--control")
    check_probes(controls)
    for c in controls:
        if c.kind in ("unify_edit", "value_sharing"):
            raise AttnCtlError(f"--control {c.kind!r} edits an existing image; generate makes new ones",
                               "use attnctl edit IMAGE --source '...' --target '...' (UnifyEdit's settings as its "
                               "--control, value sharing as --share)")
    references = list(reference_prompt) if reference_prompt else meta_in.get("reference_prompts")
    call_prompt = reposition_prompts(prompt, references, controls, "--reference-prompt")
    if images is None and not control:  # the recorded count goes with the recorded controls
        images = meta_in.get("images")
    images = images_per_prompt(controls, images, references)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise AttnCtlError(f"--out {str(out)!r} is not a .png file name", "name a .png file, e.g. out/image.png")
    torch_dtype = parse_dtype(dtype or meta_in.get("dtype") or "fp32")
    dev = check_device(device)
    if compile_backend is not None:
        compile_backend = check_compile_backend(compile_backend)
    if offload and dev.type == "cpu":
        _note("--offload is ignored on CPU: model CPU offload only saves GPU memory.")
        offload = False

    pipe = load_pipeline(model, device="cpu" if offload else str(dev), dtype=torch_dtype)
    from .sites import family_of

    family = family_of(pipe.transformer)
    check_negative(family, negative_prompt, guidance if guidance is not None else meta_in.get("guidance"), true_cfg)
    check_guidance_used(pipe.transformer, guidance)  # (the guidance a PNG records is the model's default, not a choice)
    check_vocabulary(pipe, [prompt, negative_prompt or "", *(references or [])], model)
    backend = None
    if attention_backend is not None:
        backend = set_attention_backend(pipe, attention_backend, dev, torch_dtype, gradient_controls(controls))
    if compile_backend is not None:
        compile_transformer(pipe, compile_backend)
    if offload:
        pipe.enable_model_cpu_offload(device=dev)
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty(), leave=False, desc="denoising")

    defaults = call_defaults(pipe)
    settings = {
        "steps": int(steps if steps is not None else meta_in.get("steps", defaults["steps"])),
        "guidance": float(guidance if guidance is not None else meta_in.get("guidance", defaults["guidance"])),
        "height": int(height if height is not None else meta_in.get("height", defaults["height"])),
        "width": int(width if width is not None else meta_in.get("width", defaults["width"])),
        "max_sequence_length": int(meta_in.get("max_sequence_length", defaults["max_sequence_length"])),
    }
    check_size(pipe, settings["height"], settings["width"])
    kwargs = call_kwargs(settings, call_prompt, seed, negative_prompt, true_cfg)
    if images > 1:
        kwargs["num_images_per_prompt"] = images

    start = time.perf_counter()
    made = run_pipeline(pipe, kwargs, controls)
    seconds = time.perf_counter() - start

    import diffusers

    from . import __version__
    from .imageio import save_png

    meta = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or None,
        "seed": seed,
        "generator": "cpu",
        "model": model_record(model),
        "family": family,
        "pipeline": type(pipe).__name__,
        **settings,
        "true_cfg": true_cfg,
        "dtype": DTYPE_NAMES[str(torch_dtype)[6:]],
        "controls": [c.to_json() for c in controls],
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(dev),
        "attention_backend": backend,
        "compile": compile_backend,
        "attnctl_version": __version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }
    if from_ is not None:
        meta["regenerated_from"] = str(from_)
    if images > 1:
        meta["images"] = images
    if references:
        meta["reference_prompts"] = list(references)
        outputs = [(reference_file(out, k), {**meta, "reference_index": k}) for k in range(1, len(references) + 1)]
        outputs.append((out, meta))
    else:
        outputs = [(image_file(out, i, images), meta if images == 1 else {**meta, "image_index": i})
                   for i in range(len(made))]
    for image, (target, image_meta) in zip(made, outputs, strict=True):
        path = save_png(target, image, image_meta)
        out_console.print(f"wrote {escape(str(path))}  ({escape(model)}, seed {seed}, {settings['steps']} steps, "
                          f"{image.size[0]}x{image.size[1]}, {seconds:.1f} s)", highlight=False)
    for name, heat, i in map_images(controls, [target.name for target, _ in outputs], made):
        path = save_png(out.parent / name, heat, attention_map_meta(outputs[i][0].name, outputs[i][1]))
        out_console.print(f"wrote {escape(str(path))}  (attention map)", highlight=False)
    for line in (c.summary() for c in controls):
        if line:
            err_console.print(escape(line), highlight=False)


@app.command()
@_handles_errors
def edit(
    image: Path = typer.Argument(..., help="The real image to edit (PNG, JPEG, ...)."),
    source: str = typer.Option(..., "--source", help="What the image shows, e.g. 'a red circle and a blue square'."),
    target: str = typer.Option(..., "--target", help="What it should show, e.g. 'a green circle and a blue square'."),
    model: str | None = typer.Option(
        None, "--model", "-m", help=f"{_TOYS}, a pipeline folder or a hub id (default: {DEFAULT_MODEL})"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Denoising steps (default: the model's)."),
    guidance: float | None = typer.Option(None, "--guidance", "-g",
                                          help="Guidance scale (default: the model's)."),
    control: str | None = typer.Option(
        None, "--control", "-c", help='UnifyEdit settings as JSON or @file.json, e.g. \'{"scale": 0.3}\'.'),
    solver: str = typer.Option(
        "euler", "--solver", help="euler (the pipeline's own step) or midpoint (RF-Solver's second-order step: two "
                                  "model calls a step, a closer inversion)."),
    rf: bool = typer.Option(False, "--rf", help="Add RF-Inversion's controllers (the paper's settings: gamma 0.5, "
                                                "eta 0.9 over the first quarter of the steps)."),
    rf_settings: str | None = typer.Option(
        None, "--rf-settings", help="RF-Inversion settings as JSON or @file.json (implies --rf), e.g. "
                                    "'{\"gamma\": 0.5, \"eta\": \"window(0.9, 0, 0.25)\", \"seed\": 0}'."),
    share: bool = typer.Option(False, "--share", help="Add RF-Solver-Edit's value sharing (the target attends with "
                                                      "the source's values at the late sites over the first 15% of "
                                                      "the steps)."),
    share_settings: str | None = typer.Option(
        None, "--share-settings", help="Value-sharing settings as JSON or @file.json (implies --share), e.g. "
                                       "'{\"weight\": \"window(1, 0, 0.15)\", \"sites\": \"late\", "
                                       "\"tokens\": \"all\"}'."),
    out: Path = typer.Option(Path("out/edited.png"), "--out", "-o", help="Output PNG (written atomically)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps."),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32, fp16 or bf16 (default: fp32)."),
    compile_backend: str | None = typer.Option(None, "--compile", help=COMPILE_HELP),
) -> None:
    """Edit a real image by a change of its caption (UnifyEdit: inversion, then a steered target branch)."""
    check_scales(guidance)
    from .editing import edit as edit_image
    from .imageio import read_image, save_png

    if out.suffix.lower() != ".png" or out.is_dir():
        raise AttnCtlError(f"--out {str(out)!r} is not a .png file name", "name a .png file, e.g. out/edited.png")
    spec = read_json_arg(control, "--control") if control else {}
    if not isinstance(spec, dict) or spec.get("kind", "unify_edit") != "unify_edit":
        raise AttnCtlError("--control takes the settings of the UnifyEdit control as a JSON object",
                           'pass e.g. \'{"scale": "window(0.2, 0, 0.5)", "ca_weight": 2}\'')
    ctl = build_controls([{**spec, "kind": "unify_edit"}], what="--control")[0]
    from .controls.value_sharing import ValueSharing
    from .midpoint import SOLVERS, use_solver
    from .rf_inversion import RFInversion

    rf_config = RFInversion() if rf else None
    if rf_settings is not None:
        rf_config = RFInversion.from_json(read_json_arg(rf_settings, "--rf-settings",
                                                        '{"gamma": 0.5, "eta": "window(0.9, 0, 0.25)"}'))
    share_config = ValueSharing() if share else None
    if share_settings is not None:
        share_config = ValueSharing.from_json(read_json_arg(share_settings, "--share-settings",
                                                            '{"weight": "window(1, 0, 0.15)", "tokens": "image"}'))

    if solver not in SOLVERS:
        raise AttnCtlError(f"--solver {solver!r} is not a solver attnctl edits with", f"pass {' or '.join(SOLVERS)}")
    if not image.is_file():
        raise AttnCtlError(f"no image file at {str(image)!r}", "pass the path of the image to edit")
    arr = read_image(image)
    model = model or DEFAULT_MODEL
    torch_dtype = parse_dtype(dtype or "fp32")
    dev = check_device(device)
    if compile_backend is not None:
        compile_backend = check_compile_backend(compile_backend)
    pipe = load_pipeline(model, device=str(dev), dtype=torch_dtype)
    check_vocabulary(pipe, [source, target], model)
    check_guidance_used(pipe.transformer, guidance, ("--guidance", None))
    if compile_backend is not None:
        compile_transformer(pipe, compile_backend)
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty(), leave=False, desc="editing")
    defaults = call_defaults(pipe)
    n = int(steps if steps is not None else defaults["steps"])
    g = float(guidance if guidance is not None else defaults["guidance"])
    start = time.perf_counter()
    with use_solver(pipe, solver), pipeline_refusals("the edit", EDIT_SIZE_FIX):
        result = edit_image(pipe, arr, source, target, n, control=ctl, guidance_scale=g,
                            max_sequence_length=defaults["max_sequence_length"], rf=rf_config, share=share_config)
        seconds = time.perf_counter() - start
        meta = edit_meta(pipe, image, source, target, model, n, g, defaults["max_sequence_length"], ctl,
                         DTYPE_NAMES[str(torch_dtype)[6:]], device, rf=rf_config, share=share_config,
                         compile_backend=compile_backend)
    path = save_png(out, result.edited, meta)
    out_console.print(f"wrote {escape(str(path))}  ({escape(model)}, {n} steps, {seconds:.1f} s)", highlight=False)
    for line in (c.summary() for c in (ctl, share_config) if c is not None):
        if line:
            err_console.print(escape(line), highlight=False)


EDIT_SIZE_FIX = "check the image and the settings: the model must be able to generate at the image's size"


def edit_meta(pipe: Any, image: Path, source: str, target: str, model: str, steps: int, guidance: float,
              max_sequence_length: int, control: Any, dtype: str, device: Any, rf: Any = None,
              share: Any = None, compile_backend: str | None = None) -> dict[str, Any]:
    """What an edited PNG records: the input image, both captions and everything the edit ran with (``rf``: the
    RF-Inversion settings, ``share``: the value-sharing settings, ``compile_backend``: the torch.compile backend of
    the transformer; each recorded when given)."""
    import diffusers
    import torch

    from . import __version__
    from .midpoint import is_midpoint
    from .sites import family_of

    return {"edited_from": str(image), "source_prompt": source, "prompt": target, "model": model_record(model),
            "family": family_of(pipe.transformer), "pipeline": type(pipe).__name__, "steps": steps,
            "guidance": guidance, "max_sequence_length": max_sequence_length, "controls": [control.to_json()],
            "dtype": dtype, "scheduler": type(pipe.scheduler).__name__,
            "solver": "midpoint" if is_midpoint(pipe.scheduler) else "euler", "device": str(device),
            **({"rf_inversion": rf.to_json()} if rf is not None else {}),
            **({"value_sharing": share.to_json()} if share is not None else {}),
            **({"compile": compile_backend} if compile_backend is not None else {}),
            "attnctl_version": __version__, "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__}


def reposition_prompts(prompt: str, references: Sequence[str] | None, controls: Sequence[Any],
                       option: str = "reference_prompts") -> str | list[str]:
    """The call's prompt: ``prompt`` alone, or the set ``[reference_1 … reference_n, prompt]`` when reference prompts
    are given. An isolation control that repositions its subjects after references (``references=true``) needs one
    reference prompt per subject; without such a control the set is made plainly, from the same noise as the
    repositioned one (its baseline)."""
    repositioning = [c for c in controls if getattr(c, "kind", None) == "isolation" and c.config.references]
    if len(repositioning) > 1:
        raise AttnCtlError(f"{len(repositioning)} isolation controls with references=true in one run",
                           "keep one: the call has one set of references")
    if not references:
        if repositioning:
            raise AttnCtlError("the isolation control has references=true, and no reference prompts are given",
                               f"give one {option} per subject, in the subjects' order (each showing that subject "
                               "alone), or set references to false")
        return prompt
    if any(not isinstance(r, str) or not r.strip() for r in references):
        raise AttnCtlError("a reference prompt is empty", "describe each subject alone, e.g. 'a small red circle'")
    isolating = [c for c in controls if getattr(c, "kind", None) == "isolation" and not c.config.references]
    if isolating:  # it would look for every subject in every prompt of the set, references included
        raise AttnCtlError(f"reference prompts ({option}) are given with an isolation control that does not "
                           "reposition (references is false)",
                           "set \"references\": true in the isolation control to reposition each subject after its "
                           f"reference, or leave out {option}")
    if repositioning and len(references) != len(subjects := repositioning[0].config.subjects):
        raise AttnCtlError(f"{len(references)} reference prompts for {len(subjects)} subjects "
                           f"({', '.join(map(repr, subjects))})", "give one per subject, in the subjects' order")
    if repositioning:
        from .layout import absent_words

        for i, (subject, ref) in enumerate(zip(repositioning[0].config.subjects, references, strict=True)):
            if absent_words([subject], ref):
                raise AttnCtlError(f"reference prompt {i + 1} ({ref!r}) does not name subject {i + 1} ({subject!r})",
                                   "give the reference prompts in the subjects' order, each showing its subject")
    return [*references, prompt]


def image_file(out: Path, i: int, images: int) -> Path:
    """Where image ``i`` (from 0) of a call making ``images`` images of one prompt goes: ``out`` itself for one
    image, else ``OUT-<i>.png``."""
    return out if images == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")


def reference_file(out: Path, k: int) -> Path:
    """Where reference ``k`` (from 1) of a reposition run whose scene goes to ``out`` is written."""
    return out.with_name(f"{out.stem}-ref{k}{out.suffix}")


def call_kwargs(settings: dict[str, Any], prompt: str | list[str], seed: int, negative_prompt: str | None = None,
                true_cfg: float | None = None) -> dict[str, Any]:
    """The pipeline call for one image from resolved settings (steps, guidance, size, text length); the seed
    drives a CPU generator so an image regenerates identically on any device."""
    import torch

    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": settings["steps"],
        "guidance_scale": settings["guidance"],
        "height": settings["height"],
        "width": settings["width"],
        "max_sequence_length": settings["max_sequence_length"],
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "pil",
    }
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    if true_cfg is not None:  # diffusers runs true CFG only against a negative prompt: the empty one by default
        kwargs["true_cfg_scale"] = float(true_cfg)
        kwargs.setdefault("negative_prompt", "")
    return kwargs


def attention_map_meta(image: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What an attention-map PNG records: the image it maps, and that image's settings (its probe among them)."""
    return {"attention_map_of": image, **{k: v for k, v in meta.items() if k != "batch"}}


def run_pipeline(pipe, kwargs: dict[str, Any], controls: Sequence[Any]) -> list:
    """Call the pipeline; its refusals of bad arguments (ValueError) become clear attnctl errors."""
    with pipeline_refusals("the call", "check the size, steps, guidance and prompt options"):
        return list(pipe(**kwargs, controls=list(controls) or None).images)


@contextlib.contextmanager
def pipeline_refusals(what: str, fix: str) -> Iterator[None]:
    """diffusers refuses bad arguments (a size past the model's position table, say) with a ``ValueError`` from deep
    inside: in this block, that becomes an :class:`AttnCtlError` naming ``what`` was refused and the ``fix``."""
    try:
        yield
    except AttnCtlError:
        raise
    except ValueError as e:
        raise AttnCtlError(f"the pipeline refused {what}: {_one_line(e)[:400]}", fix) from e


# ---------------------------------------------------------------------------------------------- batch


@app.command()
@_handles_errors
def batch(
    file: Path = typer.Argument(..., help="The batch JSON file (schema: attnctl/schemas/batch.schema.json)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: out/<file name>)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help=f"{_TOYS}, a pipeline folder or hub id (default: the file's, "
                                    f"else {DEFAULT_MODEL})."),
    processes: int = typer.Option(1, "--processes", "-j", min=1, help="Worker processes (torchrun-style, gloo on "
                                                                      "CPU); or start with accelerate launch."),
    device: str = typer.Option("auto", "--device", help="auto (each rank's accelerate device), cpu, cuda, ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    attention_backend: str | None = typer.Option(None, "--attention-backend", help="diffusers attention backend."),
    compile_backend: str | None = typer.Option(None, "--compile", help=COMPILE_HELP),
    offload: bool = typer.Option(False, "--offload", help="Model CPU offload for small GPUs (ignored on CPU)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads per process "
                                                                      "(default: cores / processes)."),
    check: bool = typer.Option(False, "--check", help="Validate the file and list its images; generate nothing."),
) -> None:
    """Generate every image of a JSON batch file: resumable, one PNG per image plus manifest.jsonl."""
    from . import batch as batch_run

    raise typer.Exit(batch_run.main(file, out, model, processes, device, dtype, attention_backend, offload, threads,
                                    check, debug=_STATE["debug"], compile_backend=compile_backend))


# ---------------------------------------------------------------------------------------------- headhunt


@app.command()
@_handles_errors
def headhunt(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=f"{_TOYS}, a pipeline folder or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for state.json, the score logs and heads.json "
                                                      "(re-run the same command to resume)."),
    prompts: str = typer.Option(..., "--prompts", help="Search prompts: a .txt/.json file or a built-in set name."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N prompts."),
    seeds: int = typer.Option(2, "--seeds", min=1, help="Seeds 0..N-1 per prompt (M = prompts × seeds)."),
    candidates: list[str] = typer.Option(["all"], "--candidates", help="Candidate heads: site/head selectors "
                                                                      "(repeatable; default every head)."),
    objective: str = typer.Option("toy_combined", "--objective", help="toy_combined, toy_fidelity, toy_quality, "
                                                                      "or 'module:function' / 'file.py:function'."),
    rounds: int = typer.Option(1, "--rounds", "-R", min=1, help="Greedy rounds."),
    top_k: int = typer.Option(1, "--top-k", "-k", min=1, help="Heads added per round."),
    u: float = typer.Option(1.0, "--u", help="SoftPAG strength during the search, in (0, 1]."),
    w: float = typer.Option(3.0, "--w", help="Guidance weight during the search."),
    target: str = typer.Option("identity", "--target", help="identity, uniform or mean_query."),
    scope: str = typer.Option("joint", "--scope", help="joint or image."),
    require_gain: bool = typer.Option(False, "--require-gain", help="Add only heads that beat the current set; "
                                                                    "stop when none does."),
    noise: str = typer.Option("per_prompt", "--noise", help="per_prompt: every prompt–seed pair its own initial "
                                                           "noise; shared: every prompt reuses seeds 0..N-1."),
    finalists: int = typer.Option(0, "--finalists", "-F", min=0, help="Re-score each round's F best candidates "
                                                                      "(and the current set) on more seeds."),
    finalist_seeds: int = typer.Option(0, "--finalist-seeds", min=0, help="The finalists' extra seeds: "
                                                                          "N more after the search seeds."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Denoising steps (default: the model's)."),
    guidance: float | None = typer.Option(None, "--guidance", "-g",
                                          help="CFG scale (default: the model's)."),
    height: int | None = typer.Option(None, "--height", min=16, help="Image height (default: the model's)."),
    width: int | None = typer.Option(None, "--width", min=16, help="Image width (default: the model's)."),
    batch_images: int = typer.Option(32, "--batch-images", min=1, help="Images per pipeline call."),
    processes: int = typer.Option(1, "--processes", "-j", min=1, help="Worker processes (or accelerate launch)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads per process."),
    device: str = typer.Option("auto", "--device", help="auto (each rank's accelerate device), cpu, cuda, ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    attention_backend: str | None = typer.Option(None, "--attention-backend", help="diffusers attention backend."),
) -> None:
    """HeadHunter: greedily search the heads whose SoftPAG guidance raises an objective; writes a preset."""
    check_scales(guidance)
    if bool(finalists) != bool(finalist_seeds):  # one without the other: said in the flags' words
        raise AttnCtlError("--finalists re-scores each round's best candidates on --finalist-seeds more seeds, and "
                           f"only one of them is given (--finalists {finalists}, --finalist-seeds {finalist_seeds})",
                           "give both, e.g. --finalists 4 --finalist-seeds 2, or neither")
    from . import headhunt as hh

    raise typer.Exit(hh.main(model=model, out=out, prompts=prompts, limit=limit, seeds=seeds, candidates=candidates,
                             objective=objective, rounds=rounds, top_k=top_k, u=u, w=w, target=target, scope=scope,
                             require_gain=require_gain, finalists=finalists, finalist_seeds=finalist_seeds,
                             noise=noise, steps=steps, guidance=guidance, height=height, width=width,
                             batch_images=batch_images,
                             processes=processes, threads=threads, device=device, dtype=dtype,
                             attention_backend=attention_backend, debug=_STATE["debug"]))


# ---------------------------------------------------------------------------------------------- eval


def load_prompt_items(spec: str, limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Prompt items from a JSON file or a built-in set name, validated; errors name the item and field."""
    from .toyworld.world import PROMPT_SETS, parse_caption, prompt_set

    path = Path(spec).expanduser()
    if path.is_file():
        data = read_json_arg(f"@{path}", "--prompts", '[{"prompt": "a red circle"}, "a blue square"]',
                             "a JSON list of prompt items")
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            data = data["items"]
        if not isinstance(data, list) or not data:
            raise AttnCtlError(f"{path} must hold a non-empty JSON list of prompt items",
                               'write [{"prompt": "a red circle"}, ...] (objects and boxes optional)')
        items = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                item = {"prompt": item}
            items.append(_check_item(item, i, parse_caption))
        label = str(path)
    elif spec in PROMPT_SETS:
        items = prompt_set(spec)
        label = spec
    else:
        raise AttnCtlError(f"--prompts {spec!r} is neither a JSON file nor a built-in prompt set",
                           f"pass a prompts file or one of the sets {', '.join(PROMPT_SETS)}")
    if limit is not None:
        items = items[:limit]
    return items, label


def _check_item(item: Any, i: int, parse_caption: Callable) -> dict[str, Any]:
    where = f"prompt item {i}"
    if not isinstance(item, dict):
        raise AttnCtlError(f"{where} is {type(item).__name__}, not an object", 'write {"prompt": "..."}')
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise AttnCtlError(f"{where}: field 'prompt' is missing or not a non-empty string",
                           'every item needs "prompt": "<caption>"')
    objects = item.get("objects")
    if objects is None:
        try:
            objects = parse_caption(prompt)["objects"]
        except (ValueError, KeyError) as e:
            raise AttnCtlError(
                f"{where}: the evaluator cannot read objects from the prompt {prompt!r} ({_one_line(e)})",
                'give the item its "objects": [{"shape": "circle", "colour": "red"}, ...]',
            ) from None
    elif not isinstance(objects, list) or not all(isinstance(o, dict) and "shape" in o and "colour" in o
                                                  for o in objects):
        raise AttnCtlError(f"{where}: field 'objects' must be a list of objects with 'shape' and 'colour'",
                           'write "objects": [{"shape": "circle", "colour": "red", "count": 1}]')
    else:  # words the evaluator does not know would score every image as a failure
        from .toyworld.vocab import COLOURS, SHAPES

        for k, o in enumerate(objects):
            for name, known in (("colour", COLOURS), ("shape", SHAPES)):
                if o[name] not in known:
                    raise AttnCtlError(f"{where}: objects[{k}] has {name} {o[name]!r}, which the evaluator does not "
                                       "know", f"use one of {', '.join(known)} (lower case)")
            count = o.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise AttnCtlError(f"{where}: objects[{k}] has count {count!r}", "give a whole number, 1 or more")
    _check_positions(objects, where)
    _check_relation(item.get("relation"), len(objects), where)
    boxes = item.get("boxes")
    if boxes is not None:
        ok = isinstance(boxes, list) and all(
            isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(x, int | float) for x in b)
            and 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in boxes)
        if not ok:
            raise AttnCtlError(f"{where}: field 'boxes' must be a list of [x0, y0, x1, y1] boxes (image fractions, "
                               "x0 < x1 and y0 < y1, within 0 to 1)", "one box per object instance, in order")
        wanted = sum(int(o.get("count", 1)) for o in objects)
        if len(boxes) != wanted:
            raise AttnCtlError(f"{where}: field 'boxes' has {len(boxes)} boxes for {wanted} objects",
                               "give one box per object instance, in order")
    return dict(item)


def _check_positions(objects: list[dict[str, Any]], where: str) -> None:
    """Refuse an object "position" the scorer does not know (it failed with a KeyError after every image)."""
    from .toyworld.world import POSITIONS

    for k, o in enumerate(objects):
        position = o.get("position")
        if position is not None and (not isinstance(position, str) or position not in POSITIONS):
            raise AttnCtlError(f"{where}: objects[{k}] has position {position!r}, which the evaluator does not know",
                               f"use one of {', '.join(POSITIONS)}, or leave \"position\" out")


def _check_relation(relation: Any, n_objects: int, where: str) -> None:
    """Refuse a "relation" the scorer cannot read: an unknown relation name, or a subject or object that is not one
    of the item's objects (a KeyError or IndexError after every image)."""
    from .toyworld.world import RELATIONS

    if relation is None:
        return
    example = '"relation": {"subject": 0, "relation": "left", "object": 1}'
    if not isinstance(relation, dict) or not isinstance(relation.get("relation"), str) or \
            relation["relation"] not in RELATIONS:
        name = relation.get("relation") if isinstance(relation, dict) else relation
        raise AttnCtlError(f"{where}: field 'relation' names the relation {name!r}, which the evaluator does not know",
                           f"give one of {', '.join(RELATIONS)}, e.g. {example}")
    ends = [relation.get(end) for end in ("subject", "object")]
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_objects for i in ends) or \
            ends[0] == ends[1]:
        raise AttnCtlError(f"{where}: field 'relation' joins objects {ends[0]!r} and {ends[1]!r}, and the item has "
                           f"{n_objects} object(s), numbered from 0",
                           f"give two different object numbers from 0 to {n_objects - 1}, e.g. {example}")


def _word_field(kind: str) -> str:
    """The config field of control ``kind`` that names prompt words (``targets`` or ``words``)."""
    from .controls.base import config_fields

    for name in ("targets", "words"):
        if name in config_fields(kind):
            return name
    raise AttnCtlError(f"--words-from: control {kind!r} names no prompt words",
                       "use it with a word control (regulation, probe), or drop --words-from")


def _box_field(kind: str) -> str:
    """The config field of control ``kind`` that takes boxes keyed by words (``boxes``)."""
    from .controls.base import config_fields

    if "boxes" in config_fields(kind):
        return "boxes"
    raise AttnCtlError(f"--boxes-from: control {kind!r} takes no boxes",
                       "use it with a box control (layout), or drop --boxes-from")


EVAL_REFUSED: dict[str, tuple[str, str]] = {
    "unify_edit": ("edits an existing image, and attnctl eval generates new ones",
                   "use attnctl edit IMAGE --source '...' --target '...' (UnifyEdit's settings as its --control)"),
    "value_sharing": ("edits an existing image, and attnctl eval generates new ones",
                      "use attnctl edit IMAGE --source '...' --target '...' --share"),
    "epipolar": ("makes a set of views of each prompt, and attnctl eval scores one image per prompt",
                 "use attnctl generate --control '{\"kind\": \"epipolar\", ...}' (or python bench/epipolar_eval.py)"),
}
"""Control kinds attnctl eval cannot run (what each needs, and the way out)."""


def check_eval_method(method: str, settings: dict[str, Any]) -> None:
    """Refuse, before the model loads, an ``--method`` eval cannot run: an unknown kind, a kind of :data:`EVAL_REFUSED`,
    or a --config whose own "kind" says another control (--method would silently replace it)."""
    from .controls import CONTROL_TYPES

    if method not in CONTROL_TYPES:
        raise AttnCtlError(f"--method {method!r} is not a control kind",
                           f"use one of {', '.join(sorted(CONTROL_TYPES))}")
    if "kind" in settings and settings["kind"] != method:
        raise AttnCtlError(f"--config says kind {settings['kind']!r} and --method says {method!r}",
                           "leave \"kind\" out of --config: --method names the control")
    if method in EVAL_REFUSED:
        problem, fix = EVAL_REFUSED[method]
        raise AttnCtlError(f"--method {method} {problem}", fix)


def check_eval_controls(controls: Sequence[Any]) -> None:
    """Refuse an isolation control with references=true: it needs reference prompts that eval does not make."""
    if any(getattr(c, "kind", None) == "isolation" and c.config.references for c in controls):
        raise AttnCtlError("--method isolation with references=true repositions each subject after its reference "
                           "prompt, and attnctl eval makes none",
                           "set \"references\": false in --config, or use attnctl generate --reference-prompt ...")


def _batches(jobs: list[tuple[int, int]], size: int, by_item: bool) -> list[list[tuple[int, int]]]:
    if not by_item:
        return [jobs[i:i + size] for i in range(0, len(jobs), size)]
    out: list[list[tuple[int, int]]] = []
    for job in jobs:
        if out and out[-1][0][0] == job[0] and len(out[-1]) < size:
            out[-1].append(job)
        else:
            out.append([job])
    return out


@app.command("eval")
@_handles_errors
def eval_(
    prompts: str = typer.Option(..., "--prompts", help="A prompts JSON file, or a built-in set: single, pair, ..."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=f"{_TOYS}, a pipeline folder or hub id."),
    method: str | None = typer.Option(None, "--method", help="A control kind to apply (see attnctl.controls)."),
    config: str | None = typer.Option(None, "--config", help="The control's settings as JSON or @file.json."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds 0..N-1 per prompt item."),
    noise: str = typer.Option("shared", "--noise", help="shared: every item uses generator seeds 0..N-1; "
                                                        "per_prompt: item i's seed s is s + 1000003·i, so no two "
                                                        "images share their initial noise (as headhunt and the "
                                                        "benches)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Denoising steps (default: the model's)."),
    guidance: float | None = typer.Option(None, "--guidance", "-g",
                                          help="Guidance scale (default: the model's)."),
    words_from: str | None = typer.Option(
        None, "--words-from", help="Fill the control's words (regulation targets, probe words) from each item's "
                                   "objects: shapes, colours, both or phrases."),
    boxes_from: str | None = typer.Option(
        None, "--boxes-from", help="Give the control (layout) each item's boxes, keyed by its objects' colours, "
                                   "shapes or phrases."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N prompt items."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per pipeline call."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    attention_backend: str | None = typer.Option(None, "--attention-backend", help="diffusers attention backend."),
    compile_backend: str | None = typer.Option(None, "--compile", help=COMPILE_HELP),
) -> None:
    """Generate every prompt item with seeds 0..N-1 and score the images with the shapes-world evaluator."""
    check_scales(guidance)
    import numpy as np
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .headhunt import NOISE_KINDS, pair_seed
    from .toyworld.evaluate import evaluate_set
    from .toyworld.world import BOX_KEYS, WORD_KINDS, object_boxes, object_words

    if noise not in NOISE_KINDS:
        raise AttnCtlError(f"--noise {noise!r} is not a noise design", f"use one of {', '.join(NOISE_KINDS)}")
    items, label = load_prompt_items(prompts, limit)
    settings_json = None
    controls = []
    if config is not None and method is None:
        raise AttnCtlError("--config needs --method", "pass --method KIND with --config JSON")
    if method is not None:
        settings_json = read_json_arg(config, "--config") if config is not None else {}
        if not isinstance(settings_json, dict):
            raise AttnCtlError("--config must be a JSON object", 'e.g. --config \'{"words": ["circle"]}\'')
        check_eval_method(method, settings_json)
        if words_from is None and boxes_from is None:
            from .controls.base import config_fields

            for field, flag in (("targets", "--words-from"), ("boxes", "--boxes-from")):
                if field in config_fields(method) and field not in settings_json:  # a field eval fills per item
                    raise AttnCtlError(f"--method {method} needs its {field}, and every prompt item has its own",
                                       f"pass {flag} (e.g. {flag} phrases) to take them from each item, or give "
                                       f"them in --config")
            controls = build_controls([{**settings_json, "kind": method}], what=f"--method {method}")
    if words_from is not None and boxes_from is not None:
        raise AttnCtlError("--words-from and --boxes-from both fill the control's words", "pass one of them")
    per_item = words_from if words_from is not None else boxes_from
    if per_item is not None:
        flag = "--words-from" if words_from is not None else "--boxes-from"
        if method is None:
            raise AttnCtlError(f"{flag} needs --method", f"pass --method {'regulation' if words_from else 'layout'} "
                                                         f"with {flag}")
        if words_from is not None:
            field = _word_field(method)
            if words_from not in WORD_KINDS:
                raise AttnCtlError(f"--words-from {words_from!r} is not a word kind",
                                   f"use one of {', '.join(WORD_KINDS)}")
        else:
            field = _box_field(method)
            if boxes_from not in BOX_KEYS:
                raise AttnCtlError(f"--boxes-from {boxes_from!r} is not a box key", f"use one of {', '.join(BOX_KEYS)}")
            for item in items:
                object_boxes(item, boxes_from)  # every item has a layout its words can key
        if field in settings_json:  # each item's words replace it: it would be recorded but never used
            raise AttnCtlError(f"--config gives {field!r} and {flag} fills it from each prompt item",
                               f"leave {field!r} out of --config, or leave out {flag}")

        def controls_for(item: dict[str, Any]) -> list:  # one set per prompt item: its own words (and boxes)
            value = object_words(item, words_from) if words_from is not None else object_boxes(item, boxes_from)
            return build_controls([{**settings_json, "kind": method, field: value}], what=f"--method {method}")

        controls = controls_for(items[0])  # checks the settings before the model loads
    check_eval_controls(controls)
    torch_dtype = parse_dtype(dtype)
    dev = check_device(device)
    if compile_backend is not None:
        compile_backend = check_compile_backend(compile_backend)

    pipe = load_pipeline(model, device=str(dev), dtype=torch_dtype)
    check_guidance_used(pipe.transformer, guidance, ("--guidance", None))
    if not is_toy_pipeline(pipe):
        raise AttnCtlError(f"attnctl eval scores images with the shapes world's detector, and {model!r} is not a toy "
                           "model (its tokenizer is not the shapes world's): its scores would be zeros that mean "
                           "nothing", "evaluate a toy model (toy-sd3, toy-flux, toy-flux-dev, or a folder attnctl toy "
                                      "train wrote); compare a real model's images with the examples (--model)")
    check_vocabulary(pipe, [it["prompt"] for it in items], model)
    if attention_backend is not None:
        set_attention_backend(pipe, attention_backend, dev, torch_dtype, gradient_controls(controls))
    if compile_backend is not None:
        compile_transformer(pipe, compile_backend)
    pipe.set_progress_bar_config(disable=True)
    defaults = call_defaults(pipe)
    call = {
        "num_inference_steps": int(steps if steps is not None else defaults["steps"]),
        "height": int(defaults["height"]),
        "width": int(defaults["width"]),
        "max_sequence_length": int(defaults["max_sequence_length"]),
        "output_type": "pil",
    }
    if guidance_acts(pipe.transformer):  # (toy-flux: no guidance at all, recorded as null, not diffusers' 3.5)
        call["guidance_scale"] = float(guidance if guidance is not None else defaults["guidance"])
    jobs = [(i, s) for i in range(len(items)) for s in range(seeds)]
    # With controls, one item per call: word controls may be built per item, and records stay per item.
    batches = _batches(jobs, batch_size, by_item=bool(controls))
    images: list[Any] = []
    start = time.perf_counter()
    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("eval", total=len(jobs))
        for chunk in batches:
            kwargs = dict(call, prompt=[items[i]["prompt"] for i, _ in chunk],
                          generator=[torch.Generator("cpu").manual_seed(pair_seed(i, s, noise)) for i, s in chunk])
            chunk_controls = controls_for(items[chunk[0][0]]) if per_item is not None else controls
            for img in run_pipeline(pipe, kwargs, chunk_controls):
                images.append(np.asarray(img.convert("RGB")))
            bar.advance(task, len(chunk))
    seconds = time.perf_counter() - start
    try:
        metrics = evaluate_set(images, [items[i] for i, _ in jobs])
    except ValueError as e:
        raise AttnCtlError(f"cannot score the images: {_one_line(e)}", "check the prompt items' objects and boxes") \
            from e
    result = {
        "model": model_record(model),
        "prompts": label,
        "items": len(items),
        "seeds": seeds,
        "noise": noise,
        "method": method,
        "config": (controls[0].to_json() if per_item is None else {**settings_json, "kind": method})
        if controls else None,
        "words_from": words_from,
        "boxes_from": boxes_from,
        "steps": call["num_inference_steps"],
        "guidance": call.get("guidance_scale"),
        "height": call["height"],
        "width": call["width"],
        "dtype": DTYPE_NAMES[str(torch_dtype)[6:]],
        "seconds_per_image": seconds / max(len(jobs), 1),
        "metrics": metrics,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{label} · {result['model']} · {len(items)} items × {seeds} seeds"
                        + (f" · {method}" if method else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("images", justify="right")
    for key, value in metrics.items():
        if key.startswith("n_"):
            continue
        n = metrics.get(f"n_{key}", value if key == "n_images" else None)
        table.add_row(key, f"{value:.3f}", "" if n is None else str(int(n)))
    out_console.print(table)
    shown = "no guidance" if result["guidance"] is None else f"guidance {result['guidance']}"
    out_console.print(f"{call['num_inference_steps']} steps, {shown}, {result['seconds_per_image']:.2f} s per image",
                      highlight=False)


# ---------------------------------------------------------------------------------------------- inspect


def _transformer_config_of(model: str) -> dict[str, Any]:
    """The transformer config of a model (toy name, folder or hub id); a folder's that is not a readable JSON object
    is one clear error (configs.transformer_config), not a traceback."""
    from diffusers import SD3Transformer2DModel

    from .configs import transformer_config

    _quiet_libraries()
    location = resolve_model(model)
    local = Path(location) / "transformer" / "config.json"
    if Path(location).is_dir():
        if not local.is_file():
            raise AttnCtlError(f"{location} has no transformer/config.json",
                               "pass a complete diffusers pipeline folder")
        return transformer_config(local)
    try:
        return dict(SD3Transformer2DModel.load_config(location, subfolder="transformer"))
    except (OSError, ValueError) as e:
        raise AttnCtlError(f"cannot read the transformer config of {model!r}: {_one_line(e)[:300]}",
                           "check the model name (and the network, for a hub id)") from None


@app.command()
@_handles_errors
def inspect(
    model: str | None = typer.Option(None, "--model", "-m",
                                     help=f"A model: toy name, pipeline folder or hub id (default: {DEFAULT_MODEL})."),
    config: str | None = typer.Option(
        None, "--config",
        help="A full-size config built on the meta device (no weights): sd3-medium, sd3.5-medium, sd3.5-large, "
             "flux.1-dev, flux.1-schnell, or a transformer config.json.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """List a model's attention sites (index L, name, kind, heads, head dim) and totals."""
    from .configs import build_empty, transformer_config
    from .sites import family_of, list_sites

    if model is not None and config is not None:
        raise AttnCtlError("--model and --config are exclusive", "pass one of them")
    if config is not None:
        cfg, label = transformer_config(config), config
    else:
        label = model or DEFAULT_MODEL
        cfg = _transformer_config_of(label)
    transformer = build_empty(cfg)
    sites = list_sites(transformer)
    by_kind: dict[str, int] = {}
    for s in sites:
        by_kind[s.kind] = by_kind.get(s.kind, 0) + 1
    result = {
        "model": label,
        "class": type(transformer).__name__,
        "family": family_of(transformer),
        "sites": [{"index": s.index, "label": s.label, "name": s.name, "kind": s.kind, "heads": s.heads,
                   "head_dim": s.head_dim} for s in sites],
        "totals": {"sites": len(sites), "heads": sum(s.heads for s in sites), "by_kind": by_kind},
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{label} · {result['class']}")
    for col, justify in (("L", "right"), ("name", "left"), ("kind", "left"), ("heads", "right"),
                         ("head dim", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in sites:
        table.add_row(str(s.index), s.name, s.kind, str(s.heads), str(s.head_dim))
    out_console.print(table)
    kinds = ", ".join(f"{n} {k}" for k, n in by_kind.items())
    out_console.print(f"{len(sites)} sites ({kinds}), {result['totals']['heads']} heads", highlight=False)


# ---------------------------------------------------------------------------------------------- ui


@app.command()
@_handles_errors
def ui(
    port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port to serve the UI on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    model: str | None = typer.Option(None, "--model", "-m", help=f"Model to open with (default: {DEFAULT_MODEL})."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps: where the UI's models run."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (bf16 for a large model on a GPU)."),
) -> None:
    """Open the editing UI (Streamlit): generate, compare, look at attention, export."""
    import signal
    import subprocess

    if importlib.util.find_spec("streamlit") is None:
        raise AttnCtlError("the UI needs Streamlit, which is not installed", "pip install 'attnctl[ui]'")
    from .ui import DEVICE_ENV, DTYPE_ENV, LOCAL_HOSTS, MODEL_ENV, streamlit_command

    parse_dtype(dtype)  # refused here, with its way out, rather than on the app's page
    check_device(device)
    if host not in LOCAL_HOSTS:
        _note(f"warning: serving on {host}: anyone who can reach this address can use the UI and this machine's "
              "compute; the UI has no login. Use the default 127.0.0.1 unless you mean it.")
    env = dict(os.environ)
    if model:
        env[MODEL_ENV] = model
    env[DEVICE_ENV], env[DTYPE_ENV] = device, dtype
    out_console.print(f"attnctl ui on http://{'[' + host + ']' if ':' in host else host}:{port}  (Ctrl-C stops)",
                      highlight=False)
    proc = subprocess.Popen(streamlit_command(sys.executable, host, port), env=env)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # stopping attnctl ui stops the server
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the server too (same process group); let it finish
        code = proc.wait()
    raise typer.Exit(0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code)


# ---------------------------------------------------------------------------------------------- toy


@toy_app.command("train")
@_handles_errors
def toy_train(
    model: str = typer.Option(..., "--model", "-m", help="toy-sd3, toy-flux, toy-sd3-tokens, toy-flux-tokens or "
                                                          "toy-flux-dev (with --distill-from)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the checkpoint, log and pipeline."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps."),
    minutes: float | None = typer.Option(None, "--minutes", min=0.0, help="Wall-clock budget, across resumes."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="Images per step."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    warmup: int | None = typer.Option(None, "--warmup", min=1, help="Steps of linear learning-rate warm-up "
                                                                   "(default 200)."),
    seed: int | None = typer.Option(None, "--seed", help="Weights and data seed."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads for this process."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    init_from: str | None = typer.Option(None, "--init-from", help="Fine-tune from this toy pipeline (a name or "
                                                                   "folder of the same architecture)."),
    omit_named: float | None = typer.Option(None, "--omit-named", min=0.0, max=1.0,
                                            help="Fraction of multi-object scenes drawn without one object "
                                                 "their caption names (a world that teaches word neglect)."),
    distill_from: str | None = typer.Option(None, "--distill-from", help="Guidance distillation from this FLUX "
                                            "teacher (name or folder), e.g. toy-flux for toy-flux-dev."),
) -> None:
    """Train a toy model on the shapes world (resumable; a progress bar)."""
    if importlib.util.find_spec("attnctl.toyworld.train") is None:
        raise AttnCtlError("the toy training code (attnctl.toyworld.train) is not part of this installation",
                           "install an attnctl version that ships it")
    from .toyworld import train as training

    _quiet_libraries()
    if model not in training.PRESETS:
        raise AttnCtlError(f"unknown toy model {model!r}", f"use one of {', '.join(training.PRESETS)}")

    checkpoint = out / getattr(training, "CHECKPOINT_NAME", "checkpoint.pt")
    if resume and not checkpoint.is_file():
        raise AttnCtlError(f"--resume: no checkpoint in {out}", "drop --resume to start a new training run")
    options = {"steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "seed": seed, "minutes": minutes,
               "threads": threads,
               "init_from": init_from, "omit_named": omit_named, "distill_from": distill_from}
    kwargs = {k: v for k, v in options.items() if v is not None}
    if checkpoint.is_file():  # a run is there: continue it as it was set up, never overwrite it unasked
        was = training.checkpoint_settings(checkpoint)
        if not resume:
            raise AttnCtlError(f"{out} already holds a training run of {was['model']} (its checkpoint is at step "
                               f"{was['step']})", "pass --resume to continue it, or give another --out (or remove "
                                                  "its checkpoint.pt to start over)")
        given = dict(kwargs, model=model)
        changed = [f"--{k.replace('_', '-')} {given[k]} (the run's: {was.get(k)})" for k in training.RESUME_FIXED
                   if k in given and str(given[k]) != str(was.get(k))]
        if changed:
            raise AttnCtlError(f"--resume continues the run as it was set up, and {'; '.join(changed)} differ",
                               "leave those options out (a larger --steps or --minutes extends the run), or train "
                               "into another --out")
    folder = training.train(model, out, resume=resume, progress=True, **kwargs)
    out_console.print(f"wrote {escape(str(folder))}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
