"""The online engine: encode the gallery once, stream the queries batch by batch through a method.

One module per concern (see each module's docstring); imports go one way:
``runner`` -> ``retriever`` / ``rundir`` / ``report`` -> ``gallery`` / ``stream`` -> ``config``.

- :mod:`.config`    ``RunConfig``: the settings of a run and what may change on resume
- :mod:`.stream`    query order, shifted query items, batches, model input
- :mod:`.gallery`   source weights digest, gallery encoding and its on-disk cache
- :mod:`.retriever` ``Retriever``: the online core (model + method + gallery) shared by run, bench, serve
- :mod:`.rundir`    an output directory: log, checkpoint, resume
- :mod:`.report`    summaries, forgetting, JSON and tables
- :mod:`.runner`    ``run(cfg)``: the stream loop
"""

from .config import RESULT_KEYS, RESUME_FREE, RunConfig, settings_changed
from .gallery import default_cache_dir, encode_all, encode_gallery, load_source, source_weights, weights_digest
from .report import clean_forgetting, format_table, general_forgetting, json_safe, summarise, write_json
from .retriever import Retriever
from .rundir import RunDir
from .runner import run
from .stream import QueryItems, query_order, stream_batches, to_model_input

__all__ = [
    "RESULT_KEYS", "RESUME_FREE", "RunConfig", "settings_changed", "default_cache_dir", "encode_all",
    "encode_gallery", "load_source", "source_weights", "weights_digest", "clean_forgetting", "general_forgetting",
    "format_table", "json_safe", "summarise", "write_json", "Retriever", "run", "RunDir", "QueryItems",
    "query_order", "stream_batches", "to_model_input",
]
