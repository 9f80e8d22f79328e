"""Decoding Explorer engine: models, decoders, events and the recorder. Knows nothing of storage or UI.

    from engine import load_model, record, Run, RunSettings
    model = load_model("smollm2-135m-instruct")
    trace = record(model, "top_p", "Explain entropy.", {"top_p": 0.9}, RunSettings(seed=7))
    for event in Run(model, "greedy", "Hello"):  # or iterate events as they happen
        print(event)
"""

__version__ = "0.1.0"

from engine.models import load_model  # noqa: E402
from engine.run import Run, RunSettings, record  # noqa: E402

__all__ = ["Run", "RunSettings", "load_model", "record", "__version__"]
