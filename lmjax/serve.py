"""`python -m lmjax.serve --workdir DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8]`

Serves the newest checkpoint of a run over HTTP in OpenAI's format (`/v1/models`,
`/v1/chat/completions`, `/v1/completions`), so OpenAI's clients talk to it. One model, one
decode at a time: waiting requests with the same sampling settings are decoded together, up
to --max-batch rows (docs/serving.md). Needs `pip install 'lmjax[serve]'`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from lmjax import storage
from lmjax.config import UserError
from lmjax.data.chat_template import TemplateError
from lmjax.generate import Generator


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.serve", description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True, help="a run folder with a checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every one)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the log says which)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config (mesh.*)"
    )
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        raise UserError(f"--max-batch {args.max_batch}: give at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        try:
            import uvicorn

            from lmjax import serve_api  # FastAPI
        except ImportError as e:
            raise UserError(f"serving needs FastAPI and uvicorn ({e}); pip install 'lmjax[serve]'") from e
        with _listen(args.host, args.port) as sock:  # before loading: a taken port fails at once
            generator = Generator.from_workdir(args.workdir, args.set, log=_print)
            model_id = storage.path(args.workdir).name
            try:  # an imported template that does not compile stops here, not at each request
                _ = generator.template
            except TemplateError:
                raise
            except UserError as e:  # a tokenizer without chat pieces: completions only
                _print(f"chat completions are off: {e}")
            app = serve_api.build_app(generator, model_id, args.max_batch, _print)
            host, port = sock.getsockname()[:2]
            context = generator.exp.model.seq_len
            _print(f"serving {model_id} at http://{host}:{port}/v1 (context {context} tokens)")
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
            server.run(sockets=[sock])
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host") from e


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
