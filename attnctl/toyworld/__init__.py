"""The toy shapes world: the trained toy pipelines, the world that makes their data and the evaluator."""

TOY_MODEL_NAMES: tuple[str, ...] = ("toy-sd3", "toy-flux", "toy-flux-dev")
"""The toy models shipped in the package, by name (a light import: the CLI and the UI list them)."""
