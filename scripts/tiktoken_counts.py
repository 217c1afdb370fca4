#!/usr/bin/env python3
"""Token counts by OpenAI's Python tiktoken for every document text of a JSONL corpus.

Prints one JSON line per document: {"cl100k_base": n, "o200k_base": m}. Used by the test
that holds the Rust counts to tiktoken's. Needs TIKTOKEN_CACHE_DIR offline (see Makefile).
"""
import json, sys
import tiktoken

encs = {name: tiktoken.get_encoding(name) for name in ("cl100k_base", "o200k_base")}
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.strip()
    if not line:
        continue
    text = json.loads(line)["text"]
    print(json.dumps({n: len(e.encode(text, disallowed_special=())) for n, e in encs.items()}))
