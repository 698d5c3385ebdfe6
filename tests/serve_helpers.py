"""Shared pieces of the ``queryshift serve`` tests: a tiny shapes gallery, images as bytes, free ports."""

from __future__ import annotations

import base64
import io
import os
import socket

from queryshift.serve import OnlineService, ServeConfig

GALLERY = "shapes:test:24"  # 24 images, 120 captions: a gallery encoded in a second


def config(tmp, **kw) -> ServeConfig:
    values = {"data": GALLERY, "micro_batch": 4, "adapt_batch": 8, "bank_size": 16, "max_wait": 60.0,
              "cache_dir": os.path.join(str(tmp), "cache"), "progress": False}
    values.update(kw)
    return ServeConfig(**values)


def service(tmp, start_worker: bool = False, **kw) -> OnlineService:
    return OnlineService(config(tmp, **kw), start_worker=start_worker)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
