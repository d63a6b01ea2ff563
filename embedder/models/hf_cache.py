"""The Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), where timm and OpenCLIP keep
downloaded weights: whether a repository's files are there, and installing a local file where their
hub download finds it offline (``embedder weights import FILE --backbone timm:…|open_clip:…``). The
layout is huggingface_hub's: ``models--ORG--NAME/refs/main`` names a snapshot folder holding the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import cache
from pathlib import Path


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def repo_dir(repo: str) -> Path:
    return hub_cache() / ("models--" + repo.strip("/").replace("/", "--"))


def hub_cached(repo: str) -> bool:
    """Whether a hub repository's files are in the local cache (a snapshot holds a file)."""
    if not repo:
        return False
    snapshots = repo_dir(repo) / "snapshots"
    return snapshots.is_dir() and any(p.is_file() for p in snapshots.rglob("*"))


def install(src: Path, repo: str, filename: str, digest: str) -> Path:
    """Put SRC in REPO's current snapshot as FILENAME (a new snapshot named by the file's digest when the
    repository has none), atomically; returns the installed path."""
    base = repo_dir(repo)
    ref = base / "refs" / "main"
    if ref.is_file() and ref.read_text().strip():
        revision = ref.read_text().strip()
    else:
        revision = hashlib.sha1(digest.encode()).hexdigest()  # 40 hex, like a commit id
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(revision)
    target = base / "snapshots" / revision / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    marks = base / IMPORTED
    try:
        known = json.loads(marks.read_text()) if marks.is_file() else {}
    except (OSError, ValueError):
        known = {}
    known[filename] = digest
    marks.write_text(json.dumps(known))
    return target


IMPORTED = "embedder-imported.json"  # beside a repository's snapshots: the files `weights import` put there


def imported_file(repo: str) -> str | None:
    """The file of REPO's current snapshot that ``embedder weights import`` installed (its bytes unchanged
    since), or None: such weights were checked by loading, never verified by the hub, and the stores made
    with them say so."""
    from embedder.models.origin import sha256_file

    base = repo_dir(repo)
    try:
        known = json.loads((base / IMPORTED).read_text())
        revision = (base / "refs" / "main").read_text().strip()
    except (OSError, ValueError):
        return None
    for filename, digest in known.items() if isinstance(known, dict) else []:
        path = base / "snapshots" / revision / str(filename)
        if path.is_file() and sha256_file(path) == digest:
            return str(filename)
    return None


def honour_offline() -> None:
    """``EMBEDDER_OFFLINE=1`` means the Hugging Face hub's offline mode too (the local cache only), even
    where huggingface_hub was imported, and read its environment, before this was asked."""
    if not os.environ.get("EMBEDDER_OFFLINE"):
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
REACH_SECONDS = 3.0


@cache
def hub_unreachable(timeout: float = REACH_SECONDS) -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) cannot be reached — its name not resolved or its port
    not answering within TIMEOUT seconds — or None. Asked once per process, before a download that is
    not in the cache: huggingface_hub otherwise retries for about a minute before failing (measured:
    53 s offline). Behind a proxy the proxy decides: None."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in PROXY_VARS):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
    return None


def offline_advice(name: str) -> str:
    """What to do when NAME's hub weights cannot be had here."""
    return (f"download the weights where the hub is reachable, then `embedder weights import FILE --backbone "
            f"{name}` (or pass --weights FILE); EMBEDDER_OFFLINE=1 uses the local cache only, without waiting "
            "for the hub")


def require_hub(name: str, repo: str) -> None:
    """A ``WeightsUnavailable`` at once, naming the way out, where NAME's hub repository REPO is
    neither in the local cache nor reachable (see ``hub_unreachable``)."""
    from embedder.errors import WeightsUnavailable

    if not repo or hub_cached(repo) or os.environ.get("HF_HUB_OFFLINE"):
        return
    why = hub_unreachable()
    if why:
        raise WeightsUnavailable(f"{name}'s weights are not in the Hugging Face cache and the hub is unreachable "
                                 f"({why}): {offline_advice(name)}")
