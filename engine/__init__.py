"""Decoding Explorer engine: models, decoders, events and the recorder. Knows nothing of storage or UI.

    from engine import load_model, record, Run, RunSettings
    model = load_model("smollm2-135m-instruct")
    trace = record(model, "top_p", "Explain entropy.", {"top_p": 0.9}, RunSettings(seed=7))
    for event in Run(model, "greedy", "Hello"):  # or iterate events as they happen
        print(event)
"""

__version__ = "0.1.0"

__all__ = ["BranchPoint", "Run", "RunSettings", "branch_point", "load_model", "record", "__version__"]


def __getattr__(name: str):
    # Lazy: storage and replay import engine.events/engine.trace without paying for torch/transformers.
    if name == "load_model":
        from engine.models import load_model

        return load_model
    if name in ("BranchPoint", "Run", "RunSettings", "branch_point", "record"):
        from engine import run

        return getattr(run, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
