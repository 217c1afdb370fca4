#!/usr/bin/env python3
"""The Python baseline of `orbit-worker bench --baseline`: the memory build as the Celery task
did it before orbit-worker, written to be as fast as plain Python reasonably is.

extract (json per line) -> clean (markup to text, NFC, hidden characters out, whitespace
collapsed) -> dedupe -> pack short chat messages per (user, kind, conversation) as our packer
does -> LangChain's RecursiveCharacterTextSplitter.from_tiktoken_encoder for the rest, at the same
size and overlap -> the `openai` client, one request at a time, batches filled to the API's
per-request limits -> qdrant-client (local mode in a directory, or a server), batched upserts.

Prints one JSON object: counts, token totals, wall time and the seconds spent in each stage.

    build_memory.py --corpus corpus.jsonl --base-url http://127.0.0.1:PORT/v1 --api-key K \
        --qdrant-path DIR | --qdrant-url http://127.0.0.1:6333
"""
import time

# Interpreter start and imports (LangChain, the openai client, qdrant-client take seconds):
# reported apart, since a Celery worker pays them once at start, not per task.
T_START = time.perf_counter()

import argparse  # noqa: E402
import gzip
import hashlib
import html
import json
import re
import sys
import unicodedata
import uuid
from datetime import datetime, timedelta

import tiktoken
from langchain_text_splitters import RecursiveCharacterTextSplitter
from openai import OpenAI
from qdrant_client import QdrantClient
from qdrant_client.models import Distance, PointStruct, VectorParams

CHAT_KINDS = {"message", "channel_post", "group_post"}
# The API's per-request limits for embeddings (as our embedder fills its requests).
MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
UPSERT_BATCH = 256
# The same packing settings as orbit-worker's defaults (pipeline/src/chunk.rs).
PACK_ITEM_MAX_TOKENS = 128
PACK_WINDOW = timedelta(days=30)
MAX_OPEN_PACKS = 4096

TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)\b[^>]*>|<!--.*?-->", re.S)
BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
              "table", "blockquote", "pre", "hr", "section", "article", "header", "footer"}
KNOWN_TAGS = BLOCK_TAGS | {"a", "b", "i", "em", "strong", "span", "code", "td", "th", "img",
                           "html", "body", "head", "title", "script", "style", "u", "s", "small"}
SCRIPT_STYLE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.S | re.I)
MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
MD_MARKS = re.compile(r"(\*\*|__|~~|```|`)")
MD_LINE = re.compile(r"^\s{0,3}(#{1,6}\s+|>\s?|[-*+]\s+)", re.M)
HIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u2060\ufeff\u00ad\u180e\u200e\u200f"
                    "\u202a-\u202e\u2066-\u2069\u2061-\u2064]")
SPACES = re.compile(r"[^\S\n]+")
BLANKS = re.compile(r"\n\s*\n\s*")
NEWLINE_RUN = re.compile(r" *\n *")


def looks_like_html(s):
    return "<" in s and any(m.group(2) is None or m.group(2).lower() in KNOWN_TAGS
                            for m in TAG.finditer(s))


def html_to_text(s):
    s = SCRIPT_STYLE.sub("", s)
    s = TAG.sub(lambda m: "\n" if (m.group(2) or "").lower() in BLOCK_TAGS else "", s)
    return html.unescape(s)


def looks_like_markdown(s):
    return ("**" in s or "](" in s or "```" in s or "~~" in s or "__" in s or s.count("`") >= 2
            or MD_LINE.search(s) is not None)


def markdown_to_text(s):
    return MD_MARKS.sub("", MD_LINE.sub("", MD_LINK.sub(r"\1", s)))


def clean(text):
    text = HIDDEN.sub("", text)
    if looks_like_html(text):
        text = html_to_text(text)
    elif looks_like_markdown(text):
        text = markdown_to_text(text)
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = SPACES.sub(" ", text)
    text = BLANKS.sub("\n\n", text)
    text = NEWLINE_RUN.sub("\n", text)
    return text.strip()


def shared_edge(prev, nxt):
    """The text `nxt` repeats from the end of `prev` (the splitter's overlap), or ''."""
    probe = nxt[:24]
    if not probe:
        return ""
    at = len(prev)
    while True:
        at = prev.rfind(probe, 0, at)
        if at < 0:
            return ""
        tail = prev[at:]
        if nxt.startswith(tail):
            return tail
        at += len(probe) - 1


def parse_time(s):
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return datetime.fromtimestamp(0).astimezone()


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


class Packer:
    """Short chat messages of one (user, kind, conversation) within the window, up to the budget."""

    def __init__(self, budget, count):
        self.budget, self.count, self.open, self.clock = budget, count, {}, 0

    def push(self, doc, tokens, out):
        self.clock += 1
        key = (doc["user_id"], doc["kind"], doc["conversation_id"])
        p = self.open.get(key)
        if p is not None:
            near = abs(doc["at"] - p["last"]) <= PACK_WINDOW
            if near and p["tokens"] + 1 + tokens <= self.budget:
                p["docs"].append(doc)
                p["tokens"] += 1 + tokens
                p["last"] = max(p["last"], doc["at"])
                p["touched"] = self.clock
                return
            out.append(self.chunk(self.open.pop(key)))
        self.open[key] = {"docs": [doc], "tokens": tokens, "last": doc["at"], "touched": self.clock}
        if len(self.open) > MAX_OPEN_PACKS:
            old = sorted(self.open.items(), key=lambda kv: kv[1]["touched"])[: len(self.open) // 2]
            for k, p in old:
                out.append(self.chunk(self.open.pop(k)))

    def finish(self, out):
        for p in sorted(self.open.values(), key=lambda p: p["touched"]):
            out.append(self.chunk(p))
        self.open.clear()

    def chunk(self, p):
        docs = p["docs"]
        text = "\n".join(d["text"] for d in docs)
        tokens = p["tokens"] if len(docs) == 1 else self.count(text)
        return {"user_id": docs[0]["user_id"], "kind": docs[0]["kind"], "text": text,
                "tokens": tokens, "source_ids": [d["source_id"] for d in docs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", default="sk-bench")
    ap.add_argument("--model", default="text-embedding-3-small")
    ap.add_argument("--dimensions", type=int, default=384)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--encoding", default="cl100k_base")
    ap.add_argument("--qdrant-path")
    ap.add_argument("--qdrant-url")
    ap.add_argument("--collection", default="orbit_memory_baseline")
    a = ap.parse_args()
    if bool(a.qdrant_path) == bool(a.qdrant_url):
        sys.exit("one of --qdrant-path or --qdrant-url")

    enc = tiktoken.get_encoding(a.encoding)
    count = lambda t: len(enc.encode_ordinary(t))  # noqa: E731
    splitter = RecursiveCharacterTextSplitter.from_tiktoken_encoder(
        encoding_name=a.encoding, chunk_size=a.chunk_size, chunk_overlap=a.overlap)
    stages = {"read_clean": 0.0, "chunk": 0.0, "embed": 0.0, "store": 0.0}
    t0 = time.perf_counter()
    startup = t0 - T_START

    # Extract, clean, dedupe: the task loads the user's documents and cleans them.
    docs, seen, read_n = [], set(), 0
    for raw in read(a.corpus):
        read_n += 1
        text = clean(str(raw.get("text") or ""))
        if not text or not isinstance(raw.get("user_id"), int):
            continue
        conv = raw.get("conversation_id")
        key = (raw["user_id"], conv or "", hashlib.blake2b(text.encode(), digest_size=16).digest())
        if key in seen:
            continue
        seen.add(key)
        docs.append({"user_id": raw["user_id"], "kind": raw.get("kind", "note"), "text": text,
                     "source_id": str(raw.get("source_id", "")), "conversation_id": conv,
                     "at": parse_time(raw.get("created_at"))})
    t1 = time.perf_counter()
    stages["read_clean"] = t1 - t0

    # Chunk: pack short chat messages, split the rest.
    chunks, packer, overlap = [], Packer(a.chunk_size, count), 0
    for d in docs:
        if d["kind"] in CHAT_KINDS and d["conversation_id"]:
            n = count(d["text"])
            if n <= PACK_ITEM_MAX_TOKENS:
                packer.push(d, n, chunks)
                continue
        pieces = splitter.split_text(d["text"])
        for i, piece in enumerate(pieces):
            chunks.append({"user_id": d["user_id"], "kind": d["kind"], "text": piece,
                           "tokens": count(piece), "source_ids": [d["source_id"]], "index": i})
            if i:
                edge = shared_edge(pieces[i - 1], piece)
                overlap += count(edge) if edge else 0
    packer.finish(chunks)
    del docs
    t2 = time.perf_counter()
    stages["chunk"] = t2 - t1

    # Embed one request at a time, batches as full as the API allows; store each batch's points.
    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=8)
    qd = QdrantClient(path=a.qdrant_path) if a.qdrant_path else QdrantClient(url=a.qdrant_url)
    if qd.collection_exists(a.collection):
        qd.delete_collection(a.collection)
    qd.create_collection(a.collection, vectors_config=VectorParams(size=a.dimensions,
                                                                    distance=Distance.COSINE))
    requests = embedded_tokens = 0

    def flush(batch):
        nonlocal requests, embedded_tokens
        t = time.perf_counter()
        r = client.embeddings.create(model=a.model, input=[c["text"] for c in batch],
                                     dimensions=a.dimensions)
        requests += 1
        embedded_tokens += sum(c["tokens"] for c in batch)
        t_store = time.perf_counter()
        stages["embed"] += t_store - t
        points = [PointStruct(
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{c['user_id']}/{c['source_ids'][0]}/{c.get('index', 0)}")),
            vector=e.embedding,
            payload={"user_id": c["user_id"], "kind": c["kind"], "text": c["text"],
                     "source_ids": c["source_ids"]}) for c, e in zip(batch, r.data)]
        for i in range(0, len(points), UPSERT_BATCH):
            qd.upsert(a.collection, points=points[i:i + UPSERT_BATCH], wait=True)
        stages["store"] += time.perf_counter() - t_store

    batch, batch_tokens = [], 0
    for c in chunks:
        if batch and (len(batch) == MAX_INPUTS or batch_tokens + c["tokens"] > MAX_REQUEST_TOKENS):
            flush(batch)
            batch, batch_tokens = [], 0
        batch.append(c)
        batch_tokens += c["tokens"]
    if batch:
        flush(batch)
    qd.close()
    wall = time.perf_counter() - t0
    json.dump({"documents_read": read_n, "chunks": len(chunks),
               "tokens": sum(c["tokens"] for c in chunks), "overlap_tokens": overlap,
               "embedded_tokens": embedded_tokens,
               "requests": requests, "wall_s": wall, "startup_s": startup, "stages": stages},
              sys.stdout)
    print()


if __name__ == "__main__":
    main()
