"""Start Decoding Explorer in the browser (locally or as a Hugging Face Space).

    python app.py [--model NAME] [--db URL] [--replay-only] [--host 127.0.0.1] [--port 7860]

Without a loadable model (or with --replay-only) the app still opens and replays stored and sample traces.
"""

from __future__ import annotations

import argparse
import os

from ui.app import CLICK_TO_SELECT_JS, DEFAULT_MODEL, THEME, build

# Several browser sessions may stream at once; two match this machine's two cores, more would only queue
# inside torch. Library and replay events are light and unlimited.
CONCURRENT_RUNS = int(os.environ.get("DECODING_EXPLORER_CONCURRENCY", "2"))


def default_model() -> str:
    # On a Hugging Face Space the Hub is reachable and the offline GGUF package is not installed.
    if os.environ.get("SPACE_ID"):
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("DECODING_EXPLORER_MODEL") or default_model())
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite file in the user data dir)")
    parser.add_argument("--replay-only", action="store_true", default=bool(os.environ.get("DECODING_EXPLORER_REPLAY_ONLY")))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    demo = build(args.model, args.db, replay_only=args.replay_only)
    demo.queue(default_concurrency_limit=CONCURRENT_RUNS).launch(server_name=args.host, server_port=args.port, theme=THEME, js=CLICK_TO_SELECT_JS)


if __name__ == "__main__":
    main()
