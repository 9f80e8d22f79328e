"""Sample traces shipped in ``assets/samples``: listed by the app beside the stored runs (from memory, never written
to the database, which may be read-only), so a replay-only app has runs to show.

``python -m ui.samples [stem ...]`` records them (or the named ones) anew with the offline model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from engine.trace import Trace, read_file
from storage import RunNotFound, RunSummary, TraceStore

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "samples"

_SUMMARY_PROMPT = (
    "Summarize in one sentence: The lighthouse on the northern cape was built in 1871. The lighthouse keeper, "
    "Ada Lind, kept the lighthouse lamp burning through the storm of 1890, and the lighthouse still stands today."
)

_WAITLINE_PROMPT = (  # one ParallelBench-style reverse task for every diffusion sample, so they can be compared
    "You are managing a waiting line at a customer service desk.\nThe previous staff member put the waiting line in "
    "the wrong order.\nPlease reverse the order of the following people in the waiting line to correct it:\n"
    '["Alice Walker", "Henry Ford", "Grace Kelly", "Alan Turner", "Barbara Knight", "Donald Hunt"]\n'
    "Please reverse the order of the list and provide only the final list.\n"
)

_QA_PROMPT = (
    "Context: The Lind lighthouse stands on the northern cape. It was built in 1871 from granite, its lamp burned "
    "whale oil until 1903, and the keeper Ada Lind lived in the cottage beside it for forty years. "
    "Question: What was the lighthouse built from?"
)

# (file stem, decoder, params, prompt, settings: attention, model (default the offline SmolLM2), max_new_tokens,
# record_top_k)
SAMPLES = [
    ("top-p-sampling", "top_p", {"top_p": 0.9, "temperature": 0.8}, "Explain entropy in one sentence.", {}),
    ("top-h-sampling", "top_h", {"top_h": 0.4, "temperature": 1.5}, "Write a haiku about the sea.", {}),
    ("beam-search", "beam", {"num_beams": 4}, "What is the capital of France?", {}),
    ("greedy-with-attention", "greedy", {}, "Name three primary colours.", {"attention": "last"}),
    ("forced-surprise", "forced", {"continuation": "The capital of France is Berlin."}, "Answer briefly.", {}),
    ("speculative-sampling", "speculative", {"draft_layers": 15, "num_draft_tokens": 5, "temperature": 0.7},
     "Explain entropy in one sentence.", {}),
    ("prompt-lookup-summary", "prompt_lookup", {}, _SUMMARY_PROMPT, {}),
    ("dyspec-tree", "dyspec", {"draft_layers": 15, "tree_size": 12, "max_depth": 5}, "Name three primary colours.", {}),
    ("token-recycling", "token_recycling", {}, _SUMMARY_PROMPT, {}),
    ("lookahead", "lookahead", {}, "Count from one to twenty in words.", {}),
    *(
        (f"diffusion-{stem}", decoder, params, _WAITLINE_PROMPT, {"model": "waitline-mdlm", "max_new_tokens": 72, "record_top_k": 5})
        for stem, decoder, params in (
            ("llada", "llada", {"block_length": 24}),
            ("llada-random", "llada", {"remasking": "random"}),
            ("fast-dllm", "fast_dllm", {"threshold": 0.9}),
            ("fast-dllm-dual-cache", "fast_dllm", {"threshold": 0.7, "cache": "dual"}),
            ("localleap", "localleap", {}),
            ("learn2pd", "learn2pd", {}),
            ("dream-entropy", "dream", {"alg": "entropy", "steps": 24}),
            ("mask-predict", "mask_predict", {"iterations": 10}),
        )
    ),
    ("diffuspec", "diffuspec", {}, _WAITLINE_PROMPT, {"model": "waitline-ar", "max_new_tokens": 72}),
    ("gift-saliency", "gift", {"alpha": 3.0}, _QA_PROMPT, {"max_new_tokens": 24}),
    ("adadec-reranks", "adadec", {}, "Name three primary colours and say why they are primary.", {"max_new_tokens": 32}),
    ("momentum", "momentum", {"alpha": 0.2}, "Write a short poem about the sea.", {"max_new_tokens": 48}),
    ("superposed-drafts", "superposed", {"n_drafts": 3}, "The best way to learn a language is", {"max_new_tokens": 16}),
    ("self-certainty-best-of-4", "self_certainty", {"n": 4, "temperature": 0.8}, "What is 17 + 25? Answer briefly.",
     {"max_new_tokens": 24}),
    ("exact-extract-spans", "exact_extract", {"max_answer_tokens": 6}, _QA_PROMPT, {"max_new_tokens": 8}),
    ("awrs-json", "awrs", {"constraint_type": "json", "constraint": '{"name": "string", "age": "integer"}', "particles": 4},
     "Describe a cat called Tom who is 3 years old as JSON.", {"max_new_tokens": 24}),
    ("kv-compress-h2o", "kv_compress", {"policy": "h2o", "budget": 24}, "Explain why the sky is blue in two sentences.",
     {"max_new_tokens": 40}),
]


def import_samples(store: TraceStore) -> int:
    """Store every shipped sample the database does not have yet; returns how many were added."""
    added = 0
    for path in sorted(SAMPLES_DIR.glob("*.json.gz")):
        trace = read_file(path)
        try:
            store.resolve(trace.run_id)
        except KeyError:
            store.save(trace)
            added += 1
    return added


class WithSamples:
    """A store and the shipped samples, listed and opened together. The samples live in an in-memory store, so the
    database is never written for them; everything else (recording, importing, the URL) is the store's own."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self._samples = TraceStore("sqlite://")
        self._lock = threading.Lock()  # the in-memory database is one connection: one transaction at a time
        added = import_samples(self._samples)  # a new, empty store: every sample is added
        self.sample_ids = frozenset(run.run_id for run in self._samples.list_runs(limit=added))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def list_runs(self, *, limit: int = 100, offset: int = 0, **filters: Any) -> list[RunSummary]:
        """As TraceStore.list_runs over both; a sample the database also holds is listed once."""
        stored = self.store.list_runs(limit=limit + offset, **filters)
        with self._lock:
            samples = self._samples.list_runs(limit=limit + offset, **filters)
        ids = {run.run_id for run in stored}
        rows = sorted(stored + [run for run in samples if run.run_id not in ids], key=lambda run: run.run_id)
        rows.sort(key=lambda run: run.created_at, reverse=True)  # the store's order: newest first, then by id
        return rows[offset : offset + limit]

    def resolve(self, run_id: str) -> str:
        return self._either("resolve", run_id)

    def load(self, run_id: str) -> Trace:
        return self._either("load", run_id)

    def summary(self, run_id: str) -> RunSummary:
        return self._either("summary", run_id)

    def export_file(self, run_id: str, path: str | Path) -> Path:
        return self._either("export_file", run_id, path)

    def delete(self, run_id: str) -> bool:
        """Delete a stored run, else a sample (until the app restarts)."""
        if self.store.delete(run_id):
            return True
        with self._lock:
            return self._samples.delete(run_id)

    def _either(self, method: str, run_id: str, *args: Any) -> Any:
        """The store's answer, else the samples' (a sample the database also holds is the database's)."""
        try:
            return getattr(self.store, method)(run_id, *args)
        except RunNotFound:
            with self._lock:
                return getattr(self._samples, method)(run_id, *args)


def record_samples(model_name: str = "smollm2-135m-instruct", stems: list[str] | None = None) -> None:
    """Record the samples named in ``stems`` (default: all) with the offline model."""
    from engine.attention import AttentionCapture
    from engine.models import load_model
    from engine.run import RunSettings, record
    from engine.trace import write_file

    models: dict[str, Any] = {}
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for stem, decoder, params, prompt, extra in SAMPLES:
        if stems and stem not in stems:
            continue
        name = extra.get("model", model_name)
        model = models.get(name) or models.setdefault(name, load_model(name))
        capture = AttentionCapture(layers=extra["attention"]) if "attention" in extra else None
        settings = RunSettings(max_new_tokens=extra.get("max_new_tokens", 48), seed=7, chat=True, attention=capture,
                               record_top_k=extra.get("record_top_k", 20))  # a diffusion step lists every position
        trace = record(model, decoder, prompt, params, settings)
        write_file(trace, SAMPLES_DIR / f"{stem}.json.gz")
        print(f"{stem}: {trace.status}, {len(trace.output_token_ids)} tokens: {trace.output_text[:60]!r}")


if __name__ == "__main__":
    import sys

    record_samples(stems=sys.argv[1:] or None)
