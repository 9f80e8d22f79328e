"""Start Decoding Explorer in the browser (locally or as a Hugging Face Space).

    python app.py [--model NAME] [--db URL] [--host 127.0.0.1] [--port 7860]
"""

from __future__ import annotations

import argparse
import os

from ui.app import DEFAULT_MODEL, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("DECODING_EXPLORER_MODEL", DEFAULT_MODEL))
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite file in the user data dir)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    demo = build(args.model, args.db)
    demo.queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
