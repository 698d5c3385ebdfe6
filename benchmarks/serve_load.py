"""Load and fault test of ``queryshift serve`` on this machine (loopback only, bounded in count and time).

Three runs of the real server process, each answering ``--queries`` queries (half captions, half PNG images
in base64) over ``--concurrency`` keep-alive connections:

1. ``--no-adapt``: the source parameters answer, no worker;
2. adaptation on (``--method``, the server's defaults: micro-batch 16, 64 queries per update, snapshot
   every 10 updates);
3. the same with a ``kill -9`` of the server half-way: clients retry on a refused connection until the
   restarted server (same ``--state-dir``) answers, and the restart must restore the last snapshot.

Printed: errors (non-200 answers or malformed bodies), lost answers (queries never answered), latency p50 /
p99 of the answered requests, throughput, and the server's update counts.

    PYTHONPATH=src python benchmarks/serve_load.py [--queries 5000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import queryshift
from queryshift.data import load_dataset

SRC = os.path.dirname(os.path.dirname(queryshift.__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, port: int, state_dir: str | None, adapt: bool, log_path: str):
        cmd = [sys.executable, "-m", "queryshift", "serve", "--data", args.data, "--method", args.method,
               "--port", str(port), "--cache-dir", args.cache_dir, "--log-level", "warning"]
        if state_dir:
            cmd += ["--state-dir", state_dir]
        if not adapt:
            cmd.append("--no-adapt")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        self.log = open(log_path, "a")
        self.port = port
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while self.get("/health") is None:
            if self.proc.poll() is not None or time.time() - t0 > 300:
                raise RuntimeError(f"the server did not start (see {log_path})")
            time.sleep(0.2)
        self.startup = time.time() - t0

    def get(self, path: str):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            return json.loads(body) if resp.status == 200 else None
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            return None

    def stop(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(120)
        self.log.close()


def make_queries(args) -> list[bytes]:
    """JSON bodies: even positions a caption, odd positions a gallery image as base64 PNG."""
    data = load_dataset(args.data)
    rng = np.random.default_rng(0)
    images = {}
    bodies = []
    for i in range(args.queries):
        if i % 2 == 0:
            body = {"text": data.texts[int(rng.integers(len(data.texts)))], "k": args.k}
        else:
            j = int(rng.integers(len(data.images)))
            if j not in images:
                buf = io.BytesIO()
                data.load_image(j).save(buf, format="PNG")
                images[j] = base64.b64encode(buf.getvalue()).decode()
            body = {"image_b64": images[j], "k": args.k}
        bodies.append(json.dumps(body).encode())
    return bodies


def load(port_of, bodies: list[bytes], concurrency: int, k: int, deadline: float, on_answer=None) -> dict:
    """Send every body once over ``concurrency`` connections; a refused or reset connection is retried (the
    server may be restarting) until ``deadline``. Returns latencies and counts."""
    lock = threading.Lock()
    state = {"next": 0, "errors": 0, "retries": 0, "answered": 0, "lat": [], "error_samples": []}

    def worker():
        conn = None
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(bodies):
                break
            while time.time() < deadline:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", port_of(), timeout=60)
                    t0 = time.perf_counter()
                    conn.request("POST", "/search", body=bodies[i], headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    raw = resp.read()
                    latency = time.perf_counter() - t0
                except (OSError, http.client.HTTPException):
                    if conn is not None:
                        conn.close()
                    conn = None
                    with lock:
                        state["retries"] += 1
                    time.sleep(0.5)
                    continue
                ok = resp.status == 200
                if ok:
                    try:
                        answer = json.loads(raw)
                        ok = len(answer["results"]) == k and isinstance(answer["adapted"], bool)
                    except (ValueError, KeyError, TypeError):
                        ok = False
                with lock:
                    if ok:
                        state["answered"] += 1
                        state["lat"].append(latency)
                    else:
                        state["errors"] += 1
                        if len(state["error_samples"]) < 3:
                            state["error_samples"].append(f"{resp.status}: {raw[:200]!r}")
                    answered = state["answered"]
                if on_answer:
                    on_answer(answered)
                break
        if conn is not None:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(state["lat"]) * 1000
    return {"sent": len(bodies), "answered": state["answered"], "errors": state["errors"],
            "lost": len(bodies) - state["answered"] - state["errors"], "retries": state["retries"],
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "throughput": state["answered"] / wall, "seconds": wall, "error_samples": state["error_samples"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="shapes")
    p.add_argument("--method", default="rest")
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cache-dir", dest="cache_dir")
    p.add_argument("--max-seconds", dest="max_seconds", type=float, default=1800,
                   help="stop retrying after this long per run (default 1800)")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="qs-serve-load-")
    args.cache_dir = args.cache_dir or os.path.join(work, "cache")
    log_path = os.path.join(work, "server.log")
    bodies = make_queries(args)
    rows, failed = [], False
    load_start = os.getloadavg()[0]  # the machine may be shared: context for the latencies

    for label, adapt in (("no adaptation (--no-adapt)", False), (f"adaptation ({args.method})", True)):
        server = Server(args, free_port(), os.path.join(work, f"state-{adapt}"), adapt, log_path)
        try:
            before = server.get("/stats")
            r = load(lambda s=server: s.port, bodies, args.concurrency, args.k, time.time() + args.max_seconds)
            after = server.get("/stats")
        finally:
            server.stop()
        r.update(label=label, updates=after["updates"] - before["updates"], skipped=after["skipped_updates"],
                 resets=after["resets"], queries_counted=after["queries"] - before["queries"])
        rows.append(r)

    # the fault run: kill -9 half-way, restart on the same state dir, clients retry
    state_dir = os.path.join(work, "state-fault")
    current = {"server": Server(args, free_port(), state_dir, True, log_path)}
    fault: dict = {}
    killed = threading.Event()

    def maybe_kill(answered):
        if answered >= len(bodies) // 2 and not killed.is_set():
            killed.set()
            threading.Thread(target=kill_and_restart).start()

    def kill_and_restart():
        server = current["server"]
        stats = server.get("/stats")
        server.proc.kill()  # SIGKILL: no shutdown handler, no final snapshot
        server.proc.wait(60)
        server.log.close()
        fault["stats_before_kill"] = {k: stats[k] for k in ("queries", "updates", "snapshots")} if stats else None
        from queryshift import plainstate  # the snapshot on disk at the moment of the kill (tensors only)

        snap = os.path.join(state_dir, "snapshot.pt")
        fault["snapshot_updates"] = plainstate.load(snap)["updates"] if os.path.exists(snap) else 0
        restarted = Server(args, server.port, state_dir, True, log_path)
        fault["restart_seconds"] = round(restarted.startup, 1)
        restored = restarted.get("/stats")
        fault["restored_updates"] = (restored["restored_from"] or {}).get("updates", 0)
        fault["updates_after_restart"] = restored["updates"]
        current["server"] = restarted

    try:
        r = load(lambda: current["server"].port, bodies, args.concurrency, args.k, time.time() + args.max_seconds,
                 on_answer=maybe_kill)
        for _ in range(600):  # the restart thread may still be finishing
            if "updates_after_restart" in fault:
                break
            time.sleep(0.5)
        after = current["server"].get("/stats")
    finally:
        current["server"].stop()
    r.update(label=f"adaptation ({args.method}), kill -9 half-way + restart", updates=after["updates"],
             skipped=after["skipped_updates"], resets=after["resets"], queries_counted=None)
    rows.append(r)

    load_end = os.getloadavg()[0]
    print(f"# queryshift serve under load: {args.queries} queries (half captions, half images) over "
          f"{args.concurrency} connections, gallery {args.data}, k {args.k}, {os.cpu_count()} CPU cores "
          f"(load average {load_start:.1f} at the start, {load_end:.1f} at the end)\n")
    print("| run | answered | server counted | errors | lost | retried connections | p50 ms | p99 ms | queries/s | "
          "updates |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        counted = "-" if r["queries_counted"] is None else r["queries_counted"]
        print(f"| {r['label']} | {r['answered']} | {counted} | {r['errors']} | {r['lost']} | {r['retries']} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput']:.1f} | {r['updates']} |")
        failed |= bool(r["errors"] or r["lost"])
    ok_restore = fault.get("restored_updates") == fault.get("snapshot_updates") == fault.get("updates_after_restart")
    print(f"\nkill -9 after {len(bodies) // 2} answers: server stats just before the kill "
          f"{fault.get('stats_before_kill')}; snapshot on disk at the kill: {fault.get('snapshot_updates')} updates; "
          f"the restart ({fault.get('restart_seconds')} s to /health) restored {fault.get('restored_updates')} "
          f"updates: {'state restored from the last snapshot' if ok_restore else 'MISMATCH'}")
    for r in rows:
        for sample in r["error_samples"]:
            print(f"error sample ({r['label']}): {sample}")
    print(f"server log: {log_path}")
    return 1 if failed or not ok_restore else 0


if __name__ == "__main__":
    sys.exit(main())
