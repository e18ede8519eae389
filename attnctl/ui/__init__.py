"""The attnctl editing UI: a Streamlit app (``attnctl ui``) to generate, compare and look at attention.

Layout of the package (the Streamlit layer is thin; everything else is plain functions):

- ``app.py``            the Streamlit script (``streamlit run attnctl/ui/app.py``);
- ``engine.py``         load a model once, run baseline + controlled generations with attention probes;
- ``setup.py``          the user's setup as plain data: PNG metadata in and out, the JSON batch item;
- ``safety.py``         checks of uploaded files (type, size, pixel count, decompression bombs);
- ``heatmap.py``        colour maps and attention overlays;
- ``schedules_ui.py``   the schedule editor (form <-> schedule JSON, strength curve);
- ``widgets.py``        keyed Streamlit widgets that keep their value across reruns;
- ``panels/``           one small module per control kind, found by a registry (a new control = one module).

Importing this package does not import Streamlit, so ``attnctl --help`` works without the ``ui`` extra.
"""

from __future__ import annotations

from pathlib import Path

APP_PATH = Path(__file__).resolve().parent / "app.py"
"""The Streamlit script that ``attnctl ui`` runs."""

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Addresses that keep the UI on this machine (the default is the first)."""

MODEL_ENV = "ATTNCTL_UI_MODEL"
"""Environment variable naming the model the app opens with (set by ``attnctl ui --model``)."""

DEVICE_ENV = "ATTNCTL_UI_DEVICE"
"""Environment variable naming the device models load on (``attnctl ui --device``; default cpu)."""

DTYPE_ENV = "ATTNCTL_UI_DTYPE"
"""Environment variable naming the dtype models load in (``attnctl ui --dtype``: fp32, fp16 or bf16; default fp32)."""

MAX_UPLOAD_MB = 16
"""Streamlit's own upload limit for the app, in MB (the app checks again, see :mod:`attnctl.ui.safety`)."""

THEME = {
    "theme.base": "dark",
    "theme.primaryColor": "#ff7a45",
    "theme.backgroundColor": "#0f1117",
    "theme.secondaryBackgroundColor": "#1a1d27",
    "theme.textColor": "#e8e6e3",
}


def streamlit_command(python: str, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The ``streamlit run`` command line of the app bound to ``host:port`` (no browser, no telemetry)."""
    args = [
        python, "-m", "streamlit", "run", str(APP_PATH),
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.headless", "true",
        "--server.showEmailPrompt", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--server.maxUploadSize", str(MAX_UPLOAD_MB),
        "--server.enableXsrfProtection", "true",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
    ]
    for key, value in THEME.items():
        args += [f"--{key}", value]
    return args


__all__ = ["APP_PATH", "DEVICE_ENV", "DTYPE_ENV", "LOCAL_HOSTS", "MAX_UPLOAD_MB", "MODEL_ENV", "THEME",
           "streamlit_command"]
