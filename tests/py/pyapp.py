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


@app.task(name="orbit.debug.fail")
def fail(exc_type, message, exc_module="builtins"):
    import importlib

    raise getattr(importlib.import_module(exc_module), exc_type)(message)


@app.task(name="orbit.debug.flaky", bind=True, max_retries=3)
def flaky(self, failures, countdown=None):
    # As orbit-worker's: a retry until it has been retried `failures` times, 1 s apart by default.
    if self.request.retries >= failures:
        return {"retries": self.request.retries}
    raise self.retry(
        exc=KeyError(f"flaky attempt {self.request.retries}"),
        countdown=1 if countdown is None else countdown,
    )
