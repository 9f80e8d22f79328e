"""Start Decoding Explorer in the browser (locally or as a Hugging Face Space).

    python app.py [--model NAME] [--db URL] [--replay-only] [--public [--allow-model NAME] [--auth USER:PASSWORD]]
                  [--host 127.0.0.1] [--port 7860]

Without a loadable model (or with --replay-only) the app still opens and replays stored and sample traces.
The port answers at once: a "starting" page (which reloads itself) holds it while Gradio, torch and the engine
are imported, and the model then loads in the background with its progress on the Run tab.
"""

from __future__ import annotations

import argparse
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine import limits  # light: no torch, so the port still answers at once

# Gradio would report usage to its analytics host at start: this app calls out only when the user asks for a model.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Several browser sessions may stream at once; two match this machine's two cores, more would only queue
# inside torch. Library and replay events are light and unlimited.
CONCURRENT_RUNS = int(os.environ.get("DECODING_EXPLORER_CONCURRENCY", "2"))
STARTING_PAGE = (b"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='1'>"
                 b"<title>Decoding Explorer</title></head><body style='font-family:system-ui,sans-serif;margin:3em'>"
                 b"<h1>Decoding Explorer</h1><p>Starting: loading the interface and the decoding engine. This page "
                 b"reloads itself when they are ready.</p></body></html>")


def default_model() -> str:
    # On a Hugging Face Space the Hub is reachable and the offline GGUF package is not installed.
    if os.environ.get("SPACE_ID"):
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    from engine.models import DEFAULT_MODEL

    return DEFAULT_MODEL


class _Starting(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # 503 with a page: browsers show it, scripts waiting for the app keep waiting
        self.send_response(503)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(STARTING_PAGE)

    def log_message(self, *args: object) -> None:
        pass


def hold_port(host: str, port: int) -> ThreadingHTTPServer:
    """Answer on ``port`` at once with the starting page, until the real app takes the port over."""
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((host, port), _Starting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("DECODING_EXPLORER_MODEL"),
                        help="default: the offline SmolLM2-135M-Instruct (on a Hugging Face Space: its Hub copy)")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite file in the user data dir)")
    parser.add_argument("--replay-only", action="store_true", default=bool(os.environ.get("DECODING_EXPLORER_REPLAY_ONLY")))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--public", action=argparse.BooleanOptionalAction, default=bool(os.environ.get("SPACE_ID")),
                        help="for a shared server (default on a Space): each browser session sees its own runs and the "
                             "samples, and models come from the built-ins and --allow-model only")
    parser.add_argument("--allow-model", action="append", default=[], metavar="NAME",
                        help="a model a public app also offers (repeatable; or $DECODING_EXPLORER_ALLOW_MODELS, "
                             "comma-separated)")
    parser.add_argument("--auth", default=os.environ.get("DECODING_EXPLORER_AUTH"), metavar="USER:PASSWORD",
                        help="ask for this login before the app opens (Gradio's auth; or $DECODING_EXPLORER_AUTH)")
    limits.add_arguments(parser)  # --max-new-tokens-limit N and the like: engine.limits.Limits.from_args reads them
    args = parser.parse_args()
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if auth is not None and len(auth) != 2:
        parser.error("--auth takes USER:PASSWORD")
    try:
        caps = limits.Limits.from_args(args, args.public)
    except ValueError as exc:  # ParamError: a limit that is not a number
        parser.error(str(exc))
    placeholder = hold_port(args.host, args.port)
    from storage.user_errors import USER_ERRORS, user_message
    from ui.app import build, launch_options  # gradio, torch, transformers: seconds to import

    try:
        demo = build(args.model or default_model(), args.db, replay_only=args.replay_only, public=args.public,
                     allow_models=args.allow_model, limits=caps)
    except USER_ERRORS as exc:  # a bad --db URL, a damaged database: one line, not a traceback
        parser.exit(2, f"error: {user_message(exc)}\n")
    placeholder.shutdown()
    placeholder.server_close()
    demo.queue(default_concurrency_limit=CONCURRENT_RUNS).launch(server_name=args.host, server_port=args.port,
                                                                 auth=auth, **launch_options())


if __name__ == "__main__":
    main()
