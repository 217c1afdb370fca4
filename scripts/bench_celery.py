"""Throughput and CPU per task of orbit-worker against the real Python Celery worker on
`orbit.echo`, same Redis, same machine, same run.

Each round: a fresh redis-server of its own, the worker started idle, then N messages made by
the real Celery client appear at once (RESTORE of a prepared list), and the clock runs until the
queue and `unacked` are both empty (every result stored, every message acked). Worker CPU is
user+system time of the worker's whole process group; Redis commands come from
INFO commandstats, minus the harness's own polling.

usage: bench_celery.py ORBIT_WORKER_BIN [--tasks N] [--rounds R]
"""
import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
PYAPP = os.path.join(HERE, "..", "tests", "py")
TICK = os.sysconf("SC_CLK_TCK")
QUEUE = "bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_cpu(pgid):
    """User+system seconds of every live process in the group (children included)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp) is index 2 after the comm
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def commandstats(r):
    out = {}
    for k, v in r.info("commandstats").items():
        out[k.replace("cmdstat_", "")] = v["calls"]
    return out


def prepare_messages(url, n):
    """The real client publishes N echo tasks; the list is dumped for replay."""
    env = dict(os.environ, BROKER=url, QUEUE=QUEUE, PYTHONPATH=PYAPP)
    code = (
        "from pyapp import app\n"
        f"for i in range({n}):\n"
        "    app.send_task('orbit.echo', args=[i], kwargs={'k': 'v'})\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    r = redis.Redis.from_url(url)
    dump = r.dump(QUEUE)
    assert r.llen(QUEUE) == n
    return dump


def start_worker(kind, bin_path, url, logdir, events):
    env = dict(os.environ, BROKER=url, REDIS_URL=url, QUEUE=QUEUE, PYTHONPATH=PYAPP, NO_COLOR="1")
    env.pop("CELERY_BROKER_URL", None)
    env.pop("CELERY_RESULT_BACKEND", None)
    log = open(os.path.join(logdir, f"{kind.replace(':', '-')}.log"), "w")
    if kind == "python":
        celery = os.path.join(os.path.dirname(sys.executable), "celery")
        cmd = [celery, "-A", "pyapp", "worker", "-P", "prefork", "-c", "2", "-Q", QUEUE,
               "--loglevel", "INFO", "--without-mingle", "--without-gossip", "-n", f"py{free_port()}@%h"]
    else:
        # "rust" or "rust:FORMAT": our worker with that --log-format (its default: celery).
        fmt = kind.partition(":")[2]
        cmd = [bin_path, "worker", "-c", "2", "-Q", QUEUE, "--loglevel", "info"]
        if fmt:
            cmd += ["--log-format", fmt]
    if events:
        cmd.append("-E")
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        with open(log.name) as f:
            if "ready." in f.read():
                return p
        time.sleep(0.1)
    raise SystemExit(f"{kind} worker did not start; see {log.name}")


class EventCounter(threading.Thread):
    """A monitor on the events channels (as Flower's PSUBSCRIBE): counts task events, so the
    events-on figures include someone receiving them and prove they flowed."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.pubsub = redis.Redis.from_url(url).pubsub()
        self.pubsub.psubscribe("/0.celeryev/*")
        self.task_events = 0
        self.messages = 0

    def run(self):
        try:
            self.count()
        except redis.ConnectionError:
            pass  # the round's redis-server is gone: counting is over

    def count(self):
        for m in self.pubsub.listen():
            if m["type"] != "pmessage":
                continue
            self.messages += 1
            env = json.loads(m["data"])
            body = json.loads(base64.b64decode(env["body"]))
            if isinstance(body, list):
                self.task_events += len(body)


def run_round(kind, bin_path, n, dump, logdir, events):
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    counter = EventCounter(url) if events else None
    if counter:
        counter.start()
    worker = start_worker(kind, bin_path, url, logdir, events)
    try:
        time.sleep(1.0)  # past start-up: only steady-state work is counted
        polls = 0
        stats0 = commandstats(r)
        cpu0 = group_cpu(worker.pid)
        started = time.perf_counter()
        r.restore(QUEUE, 0, dump)
        while True:
            pipe = r.pipeline(transaction=False)
            pipe.llen(QUEUE)
            pipe.hlen("unacked")
            left, held = pipe.execute()
            polls += 1
            if left == 0 and held == 0:
                break
            time.sleep(0.005)
        wall = time.perf_counter() - started
        cpu = group_cpu(worker.pid) - cpu0
        stats1 = commandstats(r)
        results = len(r.keys("celery-task-meta-*"))
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        server.kill()
        server.wait()
    harness = {"llen": polls, "hlen": polls, "restore": 1, "info": 1}
    time.sleep(0.5)  # the last events in flight
    cmds = {}
    for k, v in stats1.items():
        d = v - stats0.get(k, 0) - harness.get(k, 0)
        if d > 0:
            cmds[k] = d
    assert results == n, f"{kind}: {results} results for {n} tasks"
    return {"kind": kind, "events": events, "task_events": counter.task_events if counter else 0,
            "event_messages": counter.messages if counter else 0, "tasks": n, "wall_s": wall, "tasks_per_s": n / wall,
            "cpu_ms_per_task": cpu * 1000 / n, "redis_cmds_per_task": sum(cmds.values()) / n,
            "cmds": {k: round(v / n, 3) for k, v in sorted(cmds.items())}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--events", action="store_true", help="also run both workers with -E")
    ap.add_argument("--log-formats", default="",
                    help="comma-separated --log-format values to run our worker with besides its default")
    a = ap.parse_args()
    kinds = ["python", "rust"] + [f"rust:{f}" for f in a.log_formats.split(",") if f]
    logdir = tempfile.mkdtemp(prefix="bench-celery-")
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        dump = prepare_messages(f"redis://127.0.0.1:{port}/0", a.tasks)
    finally:
        server.kill()
    rows = []
    modes = (False, True) if a.events else (False,)
    for _ in range(a.rounds):
        for events in modes:
            for kind in kinds:
                row = run_round(kind, a.bin, a.tasks, dump, logdir, events)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\norbit.echo, {a.tasks} tasks, concurrency 2, acks_late, results on (best of {a.rounds}):")
    print(f"{'worker':<12} {'-E':<4} {'tasks/s':>10} {'CPU ms/task':>12} {'redis cmds/task':>16} {'events/task':>12} {'events/msg':>11}")
    best = {}
    for events in modes:
        for kind in kinds:
            r = max((r for r in rows if r["kind"] == kind and r["events"] == events), key=lambda r: r["tasks_per_s"])
            best[(kind, events)] = r
            per_msg = r["task_events"] / r["event_messages"] if r["event_messages"] else 0
            print(f"{kind:<12} {'on' if events else 'off':<4} {r['tasks_per_s']:>10.0f} {r['cpu_ms_per_task']:>12.4f} "
                  f"{r['redis_cmds_per_task']:>16.2f} {r['task_events'] / r['tasks']:>12.2f} {per_msg:>11.1f}")
    for events in modes:
        py, rs = best[("python", events)], best[("rust", events)]
        print(f"ratio (-E {'on' if events else 'off'}): {rs['tasks_per_s'] / py['tasks_per_s']:.1f}x tasks/s, "
              f"{py['cpu_ms_per_task'] / rs['cpu_ms_per_task']:.1f}x less CPU per task")
    print(f"logs in {logdir}")


if __name__ == "__main__":
    main()
