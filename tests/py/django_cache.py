"""Django's own cache API, driven by the Rust tests: the app's view of what the worker wrote.

stdin: [{"op": "get", "key": k} | {"op": "set", "key": k, "value": v, "timeout": s}
        | {"op": "has", "key": k}]; stdout: one answer per op.
Settings as the app's: django.core.cache.backends.redis.RedisCache, default KEY_PREFIX and
VERSION (keys ":1:<key>"), unless CACHE_KEY_PREFIX / CACHE_VERSION say otherwise.
"""
import json
import os
import sys

import django
from django.conf import settings

settings.configure(
    CACHES={
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ["CACHE_LOCATION"],
            "KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", ""),
            "VERSION": int(os.environ.get("CACHE_VERSION", "1")),
        }
    }
)
django.setup()

from django.core.cache import cache  # noqa: E402

out = []
for op in json.load(sys.stdin):
    if op["op"] == "get":
        out.append(cache.get(op["key"]))
    elif op["op"] == "has":
        out.append(cache.has_key(op["key"]))
    elif op["op"] == "set":
        cache.set(op["key"], op["value"], op.get("timeout", 300))
        out.append(True)
json.dump(out, sys.stdout)
