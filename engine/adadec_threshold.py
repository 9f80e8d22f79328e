"""AdaDec's entropy threshold, learned per model (He et al. 2025, arXiv 2506.08980): the ``adadec`` decoder
pauses where the next-token entropy H >= tau. This module reads the learned table; :mod:`engine.offline.adadec_fit`
fits it:

    python -m engine.offline.adadec_fit --model smollm2-135m-instruct --out assets/adadec/thresholds.json
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.params import ParamError

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS_FILE = ROOT / "assets" / "adadec" / "thresholds.json"


def build_command(model: str) -> str:
    return f"python -m engine.offline.adadec_fit --model {model} --out assets/adadec/thresholds.json"


def learned_threshold(model_name: str, path: Path = THRESHOLDS_FILE) -> float | None:
    """The threshold learned for ``model_name`` (nats), or None when the file has none for it."""
    if not path.is_file():
        return None
    entry = json.loads(path.read_text(encoding="utf-8")).get(model_name)
    return None if entry is None else float(entry["threshold"])


def resolve_threshold(model_name: str, given: float, path: Path = THRESHOLDS_FILE) -> float:
    """``given`` when positive, else the learned threshold; a clear error when none was learned."""
    if given > 0:
        return given
    learned = learned_threshold(model_name, path)
    if learned is None:
        raise ParamError(
            f"no learned AdaDec threshold for model {model_name!r} in {path}; learn one with "
            f"`{build_command(model_name)}`, or set threshold > 0 (nats)"
        )
    return learned
