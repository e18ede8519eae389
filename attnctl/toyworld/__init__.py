"""The toy shapes world: the trained toy pipelines, the world that makes their data and the evaluator."""

TOY_MODEL_NAMES: tuple[str, ...] = ("toy-sd3", "toy-flux", "toy-flux-dev")
"""The toy models shipped in the package, by name (a light import: the CLI and the UI list them)."""


def model_record(name: str) -> str:
    """A model as runs record it (PNG metadata, batch hashes): toy names and hub ids as given, folders as absolute
    paths. A toy name stays a name even when a folder of that name lies in the working directory (e.g. a run's own
    ``--out toy-flux``): the toy is what loads (toy names are read first), and what ``--from`` must load again."""
    from pathlib import Path

    if name in TOY_MODEL_NAMES:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name
