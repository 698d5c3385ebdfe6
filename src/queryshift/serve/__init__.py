"""``queryshift serve``: a retrieval service that answers each query at once and adapts online.

One module per concern; imports go one way: ``app`` -> ``service`` -> ``worker`` / ``snapshots`` /
``guard`` / ``answering`` / ``inputs`` -> ``config`` and the engine's :class:`~queryshift.engine.Retriever`.

- :mod:`.config`     ``ServeConfig``: the settings of a server (``queryshift serve`` options)
- :mod:`.inputs`     a request's text or image -> a model-ready query item, with size limits and 4xx errors
- :mod:`.answering`  ``AnsweringModel``: the parameters that answer requests (a copy sharing the frozen
                     weights), swapped in under a lock held only for the forward
- :mod:`.guard`      diagnostics of an update and the collapse rule that resets a lane to source
- :mod:`.snapshots`  atomic snapshots of the adapted state, refused for other source weights
- :mod:`.worker`     the background thread: micro-batches from the memory bank -> ``Retriever.adapt``
- :mod:`.service`    ``OnlineService``: the lanes (one per query modality), search, stats, reset, snapshot
- :mod:`.app`        the FastAPI routes and the web page
"""

from .config import ServeConfig
from .service import OnlineService

__all__ = ["ServeConfig", "OnlineService"]
