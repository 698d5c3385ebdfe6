"""The background thread that adapts: it waits for a lane with enough new queries (or whose oldest new
query has waited ``max_wait``), runs one update on that lane's micro-batch, and keeps at most
``max_update_rate`` updates per second. Requests never wait for it (see :mod:`.answering`)."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("queryshift.serve")


class AdaptWorker(threading.Thread):
    def __init__(self, service):
        super().__init__(name="queryshift-adapt", daemon=True)
        self.service = service
        self.stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        min_gap = 1.0 / self.service.cfg.max_update_rate
        last = 0.0
        while not self.stopping.is_set():
            job = self.service.wait_for_work(self.stopping)
            if job is None:
                return
            last = time.monotonic()
            try:
                self.service.update(*job)
            except Exception as err:  # an update that fails is logged and counted; the server keeps answering
                self.error = f"{type(err).__name__}: {err}"
                self.service.count_failure(job[0], self.error)
                log.exception("update of the %s lane failed", job[0].modality)
            self.stopping.wait(max(0.0, last + min_gap - time.monotonic()))  # bounded update rate

    def stop(self, timeout: float | None = None) -> None:
        self.stopping.set()
        self.service.wake()
        self.join(timeout)
