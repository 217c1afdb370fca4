"""Celery's own event receiver and state (what Flower and `celery events` are built on), driven by
the Rust tests: listens on the broker until STOP_ON (an event type, default worker-offline)
arrives or TIMEOUT seconds pass, then prints one JSON object: every event as received, and
what celery.events.state.State made of them (workers and tasks)."""
import json
import os
import sys
import socket
import time

from pyapp import app

events = []
state = app.events.State()
stop_on = os.environ.get("STOP_ON", "worker-offline")


def main():
    with app.connection() as conn:
        def on(event):
            events.append(event)
            state.event(event)
            if event.get("type") == stop_on:
                recv.should_stop = True

        recv = app.events.Receiver(conn, handlers={"*": on})
        deadline = time.monotonic() + float(os.environ.get("TIMEOUT", "60"))
        print("listening", file=sys.stderr, flush=True)
        # capture() ends on a second without events (socket.timeout); go on until STOP_ON or the
        # deadline, so a quiet moment does not end the listening.
        while not recv.should_stop and time.monotonic() < deadline:
            try:
                recv.capture(limit=None, timeout=1, wakeup=False)
            except socket.timeout:
                continue
    workers = {
        h: {"alive": w.alive, "active": w.active, "processed": w.processed, "sw_ident": w.sw_ident,
            "freq": w.freq, "heartbeats": len(w.heartbeats)}
        for h, w in state.workers.items()
    }
    tasks = {
        u: {"state": t.state, "name": t.name, "args": t.args, "kwargs": t.kwargs, "result": t.result,
            "exception": t.exception, "retries": t.retries, "worker": t.worker.hostname if t.worker else None,
            "runtime": t.runtime}
        for u, t in state.tasks.items()
    }
    json.dump({"events": events, "workers": workers, "tasks": tasks}, sys.stdout, default=repr)


if __name__ == "__main__":
    main()
