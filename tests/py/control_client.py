"""Celery's own remote control client (what `celery inspect` / `celery control` run), driven by
the Rust tests: argv[1] is the destination node ("*" for all), argv[2:] the calls, each
`inspect:METHOD`, `query:ID,ID`, `control:METHOD[:JSON arguments]` (a broadcast waiting for replies), `revoke:ID[:terminate]` or
`broadcast:METHOD` (none asked); prints one JSON object {call: reply}."""
import json
import sys

from pyapp import app


def main():
    node = sys.argv[1]
    dest = None if node == "*" else [node]
    out = {}
    for call in sys.argv[2:]:
        kind, method = call.split(":", 1)
        if kind == "inspect":
            i = app.control.inspect(destination=dest, timeout=3)
            out[call] = getattr(i, method)()
        elif kind == "query":
            ids = method.split(",")
            out[call] = app.control.inspect(destination=dest, timeout=3).query_task(*ids)
        elif kind == "control":
            # control:METHOD or control:METHOD:{"json": "arguments"}
            method, _, args = method.partition(":")
            out[call] = app.control.broadcast(method, arguments=json.loads(args) if args else None,
                                              destination=dest, reply=True, timeout=3)
        elif kind == "revoke":
            # revoke:ID or revoke:ID:terminate, through the client's own revoke().
            task_id, _, terminate = method.partition(":")
            out[call] = app.control.revoke(task_id, destination=dest, terminate=terminate == "terminate",
                                           reply=True, timeout=3)
        elif kind == "broadcast":
            # No reply asked, as Flower and `celery control shutdown` send them.
            app.control.broadcast(method, destination=dest, reply=False)
            out[call] = None
        else:
            raise SystemExit(f"unknown call {call!r}")
    json.dump(out, sys.stdout, default=repr)


if __name__ == "__main__":
    main()
