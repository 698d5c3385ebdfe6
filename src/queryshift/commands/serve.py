"""``queryshift serve``: an HTTP retrieval service that answers each query at once and adapts online."""

from __future__ import annotations

import argparse
import logging
import os

from .run import _hparam


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve retrieval over HTTP, adapting the query encoder online as queries arrive",
        description="Encode the gallery of --data once, then answer POST /search (text or image queries) with "
                    "the current parameters at once, while a background worker adapts the query encoder on "
                    "micro-batches of recent queries. GET /stats, /health, /docs (OpenAPI) and a web page at /. "
                    "With --state-dir the adapted state is snapshotted atomically and restored at restart.")
    p.add_argument("--model", default="shapes-clip", help="backbone, as for 'queryshift run' (default shapes-clip)")
    p.add_argument("--data", default="shapes", help="the gallery dataset, as for 'queryshift run' (default shapes)")
    p.add_argument("--image-root", dest="image_root", help="folder the dataset's image paths are relative to")
    p.add_argument("--method", default="rest", help="adaptation method (default rest)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--state-dir", dest="state_dir",
                   help="where snapshots live; a restart with the same directory restores the adapted state")
    p.add_argument("--snapshot-every", dest="snapshot_every", type=int, default=10,
                   help="updates between snapshots (default 10; 0: only on shutdown and POST /snapshot)")
    p.add_argument("--token", default=os.environ.get("QUERYSHIFT_SERVE_TOKEN"),
                   help="bearer token required by POST /reset and /snapshot (default: $QUERYSHIFT_SERVE_TOKEN; "
                        "without one these endpoints are open on a loopback address and refused elsewhere)")
    p.add_argument("--modalities", default="image,text",
                   help="query modalities served, comma-separated (default image,text: one lane each)")
    g = p.add_argument_group("online adaptation")
    g.add_argument("--no-adapt", dest="adapt", action="store_false",
                   help="answer with the source parameters only (no worker)")
    g.add_argument("--micro-batch", dest="micro_batch", type=int, default=16,
                   help="new queries that trigger an update (default 16)")
    g.add_argument("--adapt-batch", dest="adapt_batch", type=int, default=64,
                   help="queries per update: the new ones plus the most recent older ones of the memory bank "
                        "(default 64)")
    g.add_argument("--max-wait", dest="max_wait", type=float, default=2.0,
                   help="seconds before an update starts with fewer than --micro-batch new queries (default 2)")
    g.add_argument("--bank-size", dest="bank_size", type=int, default=256,
                   help="recent query inputs kept per lane (default 256)")
    g.add_argument("--max-update-rate", dest="max_update_rate", type=float, default=4.0,
                   help="updates per second at most (default 4)")
    g.add_argument("--steps", type=int, default=3, help="optimisation steps per update (default 3)")
    g.add_argument("--lr", type=float, help="learning rate (default 3e-4; 3e-5 for BLIP text queries)")
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
    g.add_argument("--hparam", action="append", type=_hparam, metavar="KEY=VALUE",
                   help="method hyper-parameter, repeatable (e.g. --hparam tau=0.01)")
    g.add_argument("--min-uniformity-ratio", dest="min_uniformity_ratio", type=float, default=0.3,
                   help="collapse guard: reset when the batch's spread falls below this fraction of the source's")
    g.add_argument("--max-entropy-frac", dest="max_entropy_frac", type=float, default=0.95,
                   help="collapse guard: reset when the mean entropy over the gallery exceeds this fraction "
                        "of ln(gallery size)")
    g = p.add_argument_group("limits and the rest")
    g.add_argument("--max-text-chars", dest="max_text_chars", type=int, default=1000)
    g.add_argument("--max-image-bytes", dest="max_image_bytes", type=int, default=8 * 1024 * 1024)
    g.add_argument("--max-k", dest="max_k", type=int, default=100)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--cache-dir", dest="cache_dir", help="gallery embedding cache (default ~/.cache/queryshift)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--verbose", action="store_true",
                   help="also log the INFO lines of open_clip, transformers and huggingface_hub (model loading)")
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace):
    from ..serve import ServeConfig

    return ServeConfig(
        model=args.model, data=args.data, image_root=args.image_root, method=args.method, host=args.host,
        port=args.port, state_dir=args.state_dir, snapshot_every=args.snapshot_every, token=args.token or None,
        modalities=tuple(m.strip() for m in args.modalities.split(",") if m.strip()), adapt=args.adapt,
        micro_batch=args.micro_batch, adapt_batch=args.adapt_batch, max_wait=args.max_wait,
        bank_size=args.bank_size, max_update_rate=args.max_update_rate, steps=args.steps, lr=args.lr,
        optimizer=args.optimizer, hparams=dict(args.hparam or []),
        min_uniformity_ratio=args.min_uniformity_ratio, max_entropy_frac=args.max_entropy_frac,
        max_text_chars=args.max_text_chars, max_image_bytes=args.max_image_bytes,
        max_body_bytes=args.max_image_bytes * 4 // 3 + 64 * 1024, max_k=args.max_k, seed=args.seed,
        cache_dir=args.cache_dir, device=args.device, progress=False)


NOISY_LIBRARIES = ("open_clip", "transformers", "huggingface_hub")


class QuietLibraries(logging.Filter):
    """Drops records below WARNING that come from a model library. open_clip logs every model load at INFO on
    the root logger (not a logger of its own), so a logger level cannot silence it; the source path can."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        parts = set(record.pathname.replace("\\", "/").split("/"))
        return not parts.intersection(NOISY_LIBRARIES)


def configure_logging(level: str, verbose: bool = False) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, QuietLibraries) for f in handler.filters):
                handler.addFilter(QuietLibraries())


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import OnlineService
        from ..serve.app import create_app
    except ImportError as err:
        raise ImportError(f"queryshift serve needs the 'serve' extra: pip install 'queryshift[serve]' ({err})") from err

    configure_logging(args.log_level, args.verbose)
    cfg = config_from_args(args)
    service = OnlineService(cfg)  # the gallery is encoded (or read from the cache) before the port opens
    restored = service.restored_from
    start = f"restored {restored['updates']} updates from {restored['path']}" if restored else "source parameters"
    sizes = ", ".join(f"{la.gallery.shape[0]} {la.gallery_modality}s" for la in service.lanes.values())
    print(f"queryshift serve: {cfg.method} on {cfg.model}, gallery {cfg.data} ({sizes}), {start}; "
          f"http://{cfg.host}:{cfg.port}/ (API docs at /docs)", flush=True)
    if not cfg.loopback() and not cfg.token:
        print("queryshift serve: warning: not bound to a loopback address and no --token: /reset and /snapshot "
              "are refused", flush=True)
    try:
        uvicorn.run(create_app(service), host=cfg.host, port=cfg.port, log_level=args.log_level,
                    timeout_graceful_shutdown=10)
    finally:
        service.close()  # idempotent; covers an exception before uvicorn's own shutdown ran
    return 0
