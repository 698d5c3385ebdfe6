"""The real ``queryshift serve`` process: kill -9 keeps the last snapshot, SIGTERM writes a final one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("uvicorn", reason="queryshift serve needs the 'serve' extra (fastapi, uvicorn, httpx)")

import queryshift  # noqa: E402
from queryshift.serve import snapshots  # noqa: E402

from .serve_helpers import GALLERY, free_port  # noqa: E402

SRC = os.path.dirname(os.path.dirname(queryshift.__file__))


class Server:
    def __init__(self, tmp, state_dir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        self.log = open(os.path.join(str(tmp), f"server-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "queryshift", "serve", "--data", GALLERY, "--port", str(self.port),
             "--state-dir", state_dir, "--snapshot-every", "2", "--micro-batch", "2", "--adapt-batch", "4",
             "--max-wait", "600", "--max-update-rate", "100", "--cache-dir", os.path.join(str(tmp), "cache"),
             "--log-level", "warning"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_until(lambda: self.get("/health") is not None, "the server to answer /health")

    def request(self, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)

    def get(self, path):
        try:
            return self.request(path)
        except (urllib.error.URLError, ConnectionError):
            return None

    def wait_until(self, condition, what, attempts=600):
        for _ in range(attempts):  # bounded: at most ~2 minutes
            if self.proc.poll() is not None:
                self.log.flush()
                raise AssertionError(f"server exited with {self.proc.returncode} while waiting for {what}: "
                                     + open(self.log.name).read()[-2000:])
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}")

    def stop(self, sig):
        self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.log.close()
        return code


def search(server, text):
    return server.request("/search", {"text": text, "k": 5})


def test_kill_9_keeps_the_last_snapshot_and_sigterm_writes_one(tmp_path):
    from queryshift.data import load_dataset

    captions = load_dataset(GALLERY).texts
    state = str(tmp_path / "state")
    first = Server(tmp_path, state)
    try:
        for n in range(1, 5):  # micro-batch 2: four updates, snapshots after the 2nd and the 4th
            search(first, captions[2 * n - 2])
            search(first, captions[2 * n - 1])
            first.wait_until(lambda n=n: first.get("/stats")["updates"] == n, f"update {n}")
        first.wait_until(lambda: first.get("/stats")["snapshots"] == 2, "two snapshots")
        stats = first.get("/stats")
        assert stats["updates"] == 4 and stats["queries"] == 8
        probe = search(first, captions[20])  # banked, but alone it starts no update (max wait 600 s)
        assert probe["adapted"] is True
    finally:
        first.proc.kill()  # kill -9: no shutdown handler runs
        first.proc.wait(60)
        first.log.close()

    second = Server(tmp_path, state)
    try:
        stats = second.get("/stats")
        weights = stats["weights"]
        assert stats["restored_from"]["updates"] == 4 and stats["updates"] == 4
        assert stats["queries"] == 8  # the probe came after the last snapshot: lost, as documented
        assert search(second, captions[20]) == probe  # the same parameters answer
        search(second, captions[21])  # with the re-sent probe: a 5th update, not a multiple of 2
        second.wait_until(lambda: second.get("/stats")["updates"] == 5, "the 5th update")
        assert second.get("/stats")["snapshots"] == 0
    finally:
        code = second.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown

    # the snapshot written on SIGTERM (what a third start would restore, see tests/test_serve.py)
    assert snapshots.load(state, weights, "rest")["updates"] == 5
