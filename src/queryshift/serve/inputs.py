"""A request's query -> a model-ready item, or an :class:`InputError` that becomes a 4xx answer.

Limits are checked before the expensive step they protect: the base64 length before decoding, the
byte size before opening, the pixel count (from the header) before decoding the pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..data import pre_caption
from .config import ServeConfig


class InputError(ValueError):
    """A query the server refuses; ``status`` is the HTTP code (413 too large, 422 unreadable)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def clean_text(text: str, cfg: ServeConfig) -> str:
    """A text query as the captions of the gallery were cleaned (lowercase, punctuation, max words)."""
    if len(text) > cfg.max_text_chars:
        raise InputError(413, f"text is {len(text)} characters; the limit is {cfg.max_text_chars}")
    cleaned = pre_caption(text, cfg.max_words)
    if not cleaned:
        raise InputError(422, f"text {text[:40]!r} is empty once punctuation and spaces are removed")
    return cleaned


def decode_base64(data: str, cfg: ServeConfig) -> bytes:
    """``image_b64`` -> bytes; a ``data:image/...;base64,`` prefix (as browsers write it) is allowed."""
    if data.startswith("data:"):
        _, sep, data = data.partition(",")
        if not sep:
            raise InputError(422, "image_b64 is a data URL without a ',' before its base64 payload")
    if len(data) > (cfg.max_image_bytes + 2) // 3 * 4 + 4:
        raise InputError(413, f"image_b64 is {len(data)} characters; the image limit is {cfg.max_image_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(422, f"image_b64 is not valid base64 ({err})") from err


def open_image(raw: bytes, cfg: ServeConfig, field: str = "image_b64") -> Image.Image:
    """Bytes of an image file -> an RGB PIL image, refusing empty, oversized and unreadable files."""
    if not raw:
        raise InputError(422, f"{field} is empty")
    if len(raw) > cfg.max_image_bytes:
        raise InputError(413, f"{field} is {len(raw)} bytes; the limit is {cfg.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                w, h = im.size
                if w * h > cfg.max_image_pixels:
                    raise InputError(413, f"{field} is {w}x{h} pixels; the limit is {cfg.max_image_pixels} pixels")
                if w < 1 or h < 1:
                    raise InputError(422, f"{field} has no pixels ({w}x{h})")
                return im.convert("RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(413, f"{field} is too many pixels to decode ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(422, f"{field} is not a readable image ({type(err).__name__}: {err})") from err
