"""The Hugging Face hub as a source of pretrained weights, bounded in time.

huggingface_hub waits 10 s for a reply, then retries with 60 s timeouts: a hub endpoint that
accepts connections and never replies held a run for over three minutes. Here the hub must
answer an HTTP request within :data:`HUB_TIMEOUT_S` (after connecting within as long) before
timm is asked to download, and the download runs in a daemon thread that is given up once it
makes no progress for :data:`HUB_STALL_S`; the caller then tries its next source.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

__all__ = ["HUB_STALL_S", "HUB_TIMEOUT_S", "hub_cache_file", "hub_model", "hub_reachable"]

HUB_TIMEOUT_S = 3.0  # to connect, and again for the first reply
HUB_STALL_S = 15.0  # a download that reads no bytes for this long is given up


def _probe_url(pretrained_cfg: dict[str, Any]) -> str:
    if pretrained_cfg.get("hf_hub_id"):
        repo, _, revision = pretrained_cfg["hf_hub_id"].partition("@")
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{repo}/resolve/{revision or 'main'}/model.safetensors"
    return pretrained_cfg.get("url") or ""


def hub_reachable(pretrained_cfg: dict[str, Any]) -> tuple[bool, str]:
    """Whether the host that serves these weights answers an HTTP request within a few seconds, and why not.

    A TCP connect alone is not enough: a server that accepts and never replies passes it.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    parsed = urlparse(_probe_url(pretrained_cfg))
    host = parsed.hostname
    if not host:
        return False, "timm knows no download location for it"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    if parsed.scheme == "http":
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=HUB_TIMEOUT_S)
    else:  # liveness only, nothing is trusted from it: huggingface_hub verifies the real download
        conn = http.client.HTTPSConnection(host, port, timeout=HUB_TIMEOUT_S, context=ssl._create_unverified_context())
    try:
        conn.connect()
    except OSError as e:
        return False, f"{host} unreachable ({e.strerror or type(e).__name__})"
    try:  # any HTTP status (a redirect, 401, 404) means a server answers; huggingface_hub handles it
        conn.request("HEAD", parsed.path or "/", headers={"User-Agent": "finetune-probe"})
        conn.getresponse()
        return True, ""
    except (OSError, http.client.HTTPException) as e:
        why = "no reply" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or type(e).__name__)
        return False, f"{host} accepted the connection but gave {why} within {HUB_TIMEOUT_S:g} s"
    finally:
        conn.close()


def hub_cache_file(pretrained_cfg: dict[str, Any]) -> str | None:
    """Path of these weights in the local Hugging Face cache, if they are there."""
    repo = pretrained_cfg.get("hf_hub_id")
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


class _Progress:
    """Whether a download advanced since the last look: bytes the process read, or bytes in the download folders.

    The process's read count (``rchar`` in Linux's ``/proc/self/io``) moves with every chunk
    received, while huggingface_hub writes its file only every 10 MB; reading the counter
    counts too, so that read is subtracted.
    """

    def __init__(self, pretrained_cfg: dict[str, Any]) -> None:
        from huggingface_hub import constants

        self.folders = [os.path.join(torch.hub.get_dir(), "checkpoints")]
        if pretrained_cfg.get("hf_hub_id"):
            repo = pretrained_cfg["hf_hub_id"].partition("@")[0]
            self.folders.append(os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--")))
        try:
            self.fd: int | None = os.open("/proc/self/io", os.O_RDONLY)
        except OSError:
            self.fd = None
        self.own_reads = 0  # bytes this object read from /proc/self/io, which the counter includes
        self.last = self._sample()

    def _rchar(self) -> int:
        if self.fd is None:
            return 0
        data = os.pread(self.fd, 4096, 0)
        line = next((ln for ln in data.decode().splitlines() if ln.startswith("rchar:")), "rchar: 0")
        value = int(line.split()[1]) - self.own_reads  # as of before this read
        self.own_reads += len(data)
        return value

    def _sample(self) -> tuple[int, int]:
        size = 0
        for folder in self.folders:
            for root, _, files in os.walk(folder):
                for name in files:
                    try:
                        size += os.stat(os.path.join(root, name)).st_size
                    except OSError:
                        pass
        return self._rchar(), size

    def advanced(self) -> bool:
        now = self._sample()
        moved = now != self.last
        self.last = now
        return moved

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def hub_model(name: str, pretrained_cfg: dict[str, Any], **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, given up when the download stalls for :data:`HUB_STALL_S`.

    The download runs in a daemon thread: one that stalls is left behind (it ends with
    huggingface_hub's own timeouts) instead of holding the run for minutes.

    Raises:
        TimeoutError: no progress for :data:`HUB_STALL_S`; else whatever timm raised.
    """
    result: dict[str, Any] = {}

    def fetch() -> None:
        try:
            result["model"] = timm.create_model(name, pretrained=True, **timm_kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    progress = _Progress(pretrained_cfg)
    thread = threading.Thread(target=fetch, name=f"hub-download-{name}", daemon=True)
    thread.start()
    last_change = time.monotonic()
    try:
        while thread.is_alive():
            thread.join(0.25)
            if progress.advanced():
                last_change = time.monotonic()
            elif time.monotonic() - last_change > HUB_STALL_S:
                raise TimeoutError(f"the download made no progress for {HUB_STALL_S:g} s")
    finally:
        progress.close()
    if "error" in result:
        raise result["error"]
    return result["model"]
