"""A Python Celery app shaped like Django's: the client side of the wire tests, and the real
Python worker for the mixed-fleet test and the benchmark.

Configured from the environment: BROKER, BACKEND, QUEUE, VISIBILITY (seconds), PREFETCH, and
MASTER_NAME for sentinel:// URLs (kombu's and Celery's master_name transport option)."""
import os
import time

from celery import Celery

broker = os.environ["BROKER"]
app = Celery("orbit", broker=broker, backend=os.environ.get("BACKEND", broker))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_acks_late=True,
    result_expires=3600,
    task_default_queue=os.environ.get("QUEUE", "celery"),
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH", "4")),
    broker_transport_options={"visibility_timeout": float(os.environ.get("VISIBILITY", "3600"))},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("MASTER_NAME"):
    app.conf.broker_transport_options["master_name"] = os.environ["MASTER_NAME"]
    app.conf.result_backend_transport_options = {"master_name": os.environ["MASTER_NAME"]}


@app.task(name="orbit.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="orbit.debug.sleep")
def sleep(seconds, ignore_cancel=False):
    started = time.monotonic()
    time.sleep(seconds)
    return {"slept": time.monotonic() - started, "cancelled": False, "worker": "python"}
