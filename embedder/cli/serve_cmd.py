"""`embedder serve`: the search service over HTTP."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Optional

import typer

from embedder.cli.common import console, handle_errors, setup_logging
from embedder.errors import EmbedderError
from embedder.service.options import ServeOptions


@handle_errors
def serve_command(
    home: Annotated[Optional[str], typer.Option("--home", help="Index home (default: $EMBEDDER_HOME or ./indexes).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key_env: Annotated[Optional[str], typer.Option(help="Name of an environment variable holding the API key.")] = None,
    batch_window_ms: Annotated[float, typer.Option(min=0, help="Micro-batching window.")] = ServeOptions.batch_window_ms,
    max_batch: Annotated[int, typer.Option(min=1, help="Most queries in one micro-batch.")] = ServeOptions.max_batch,
    micro_batching: Annotated[bool, typer.Option(help="Batch concurrent queries into one forward pass.")] = ServeOptions.micro_batching,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body (an image upload).")] = ServeOptions.max_upload_bytes / 2**20,
    max_json_mb: Annotated[float, typer.Option(min=0.001, help="Largest JSON body (parsed whole before its queries are counted).")] = ServeOptions.max_json_bytes / 2**20,
    max_text_queries: Annotated[int, typer.Option(min=1, help="Most texts in one request (a forward pass each).")] = ServeOptions.max_text_queries,
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest uploaded image (width × height), and its resize target.")] = ServeOptions.max_pixels,
    poll_seconds: Annotated[float, typer.Option(min=0, help="How often indexes are checked for a new generation (0: never).")] = ServeOptions.poll_seconds,
    weights: Annotated[Optional[list[str]], typer.Option(help="FILE (given to every index whose store was made from it, matched by SHA-256) or NAME=FILE; not needed where the file is still where extract read it (the store remembers).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = ServeOptions.device,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve every index in the home over HTTP: search, embed, items, a web page at /."""
    try:
        import uvicorn

        from embedder.service.app import create_app
        from embedder.service.options import ServeOptions
    except ImportError as e:
        raise EmbedderError(f"the service needs its extra: pip install 'embedder[serve]' ({e.name} is missing)") from None
    setup_logging(verbose)
    # a server's own events (a generation loaded, an index dropped or broken) are logged in any case
    logging.getLogger("embedder.service").setLevel(logging.INFO)
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise EmbedderError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    pairs, files = {}, []
    for w in weights or []:
        name, sep, path = w.partition("=")
        if not sep:  # a file alone: given to every index whose store was made from it (by SHA-256)
            if not os.path.isfile(w):
                raise EmbedderError(f"--weights {w}: no such file (NAME=FILE gives a file to index NAME)")
            files.append(w)
            continue
        if not name or not path:
            raise EmbedderError(f"--weights takes FILE or NAME=FILE, got {w!r}")
        pairs[name] = path
    options = ServeOptions(home=home, device=device, batch_window_ms=batch_window_ms, max_batch=max_batch,
                           micro_batching=micro_batching, max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels,
                           max_json_bytes=int(max_json_mb * 2**20), max_text_queries=max_text_queries,
                           poll_seconds=poll_seconds, weights=pairs, weight_files=tuple(files))
    _check_port(host, port)
    _check_home(home)
    app = create_app(options, api_key=key)
    console.print(f"serving on http://{host}:{port}  (docs at /docs{', API key required' if key else ''})")
    config = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning")
    logging.getLogger("uvicorn.access").setLevel(logging.INFO)  # a line per request, whatever the level
    uvicorn.Server(config).run()


def _check_home(where: str | None) -> None:
    """A home that does not exist, is a file or is a store is a one-line error (the server would
    otherwise start and serve nothing, silently); an empty one is said, and served (indexes built
    into it later are picked up)."""
    from embedder.index import generations as layout
    from embedder.store.shards import MANIFEST

    root = layout.home(where)
    how = f"embedder index build STORE --name NAME --home {root}"
    if (root / MANIFEST).is_file():
        raise EmbedderError(f"{root} is an embedding store, not an index home: build an index from it first "
                            f"(embedder index build {root} --name NAME --home HOME), then serve HOME")
    if not root.exists():
        raise EmbedderError(f"index home {root} does not exist: build an index into it first ({how})")
    if not root.is_dir():
        raise EmbedderError(f"index home {root} is not a folder")
    if not layout.names(str(root)):
        console.print(f"no index in {root} yet: the page will be empty until one is built ({how}); "
                      "indexes built later are picked up")


def _check_port(host: str, port: int) -> None:
    """A port in use (or a host that is not ours) is a one-line error before anything loads."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise EmbedderError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
