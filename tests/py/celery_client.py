"""The real Celery client, driven by the Rust tests: one JSON request on stdin, one JSON answer
on stdout.

  {"op": "call", "tasks": [{"name", "args", "kwargs", "options"}], "timeout": s}
      send every task with send_task, then AsyncResult.get() each; answer one record per task:
      {"id", "state", "result"} or, when get() raised, {"id", "state", "raised": {"module",
      "type", "args", "str"}}
  {"op": "send", "tasks": [...]}          send only; answer the ids
  {"op": "get", "ids": [...], "timeout": s}  get() the given ids
"""
import json
import sys

from pyapp import app


def outcome(res, timeout):
    try:
        value = res.get(timeout=timeout, propagate=True)
        return {"id": res.id, "state": res.state, "result": value}
    except Exception as e:  # the point: which exception get() raises
        return {
            "id": res.id,
            "state": res.state,
            "raised": {
                "module": type(e).__module__,
                "type": type(e).__name__,
                "args": [a if isinstance(a, (str, int, float, bool, type(None))) else repr(a) for a in e.args],
                "str": str(e),
            },
        }


def send(tasks):
    out = []
    for t in tasks:
        out.append(app.send_task(t["name"], args=t.get("args", []), kwargs=t.get("kwargs", {}), **t.get("options", {})))
    return out


def main():
    req = json.load(sys.stdin)
    op = req["op"]
    timeout = req.get("timeout", 30)
    if op == "call":
        results = send(req["tasks"])
        answer = [outcome(r, timeout) for r in results]
    elif op == "send":
        answer = [r.id for r in send(req["tasks"])]
    elif op == "get":
        answer = [outcome(app.AsyncResult(i), timeout) for i in req["ids"]]
    else:
        raise SystemExit(f"unknown op {op!r}")
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
