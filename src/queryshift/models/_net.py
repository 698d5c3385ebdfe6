"""Whether a weights server answers, asked once and quickly: hub clients retry an unreachable host for about a
minute before they fail, so a backbone asks first when its weights are not on disk."""

from __future__ import annotations

import os
import urllib.error
import urllib.request


def hub_url(repo: str, filename: str) -> str:
    return f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/main/{filename}"


def reachable(url: str, timeout: float = 5.0) -> bool:
    """One HEAD request, no retries (proxies from the environment apply): False offline, under
    HF_HUB_OFFLINE, or when nothing answers within ``timeout``; any HTTP answer counts as reachable."""
    if not url or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered (e.g. 401 for a gated repo): the hub client can take it from here
    except (OSError, ValueError):
        return False
    return True
