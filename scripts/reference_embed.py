#!/usr/bin/env python3
"""Reference embeddings for the local embedder's test, computed once and committed.

An independent implementation of sentence-transformers' all-MiniLM-L6-v2 pipeline in numpy
(BERT forward from the safetensors weights, exact erf GELU, mean pooling over the attention
mask, L2 normalisation, truncation at 256 tokens), with HF `tokenizers` for WordPiece.

    reference_embed.py MODEL_DIR > fixtures/reference_embeddings.json
"""
import json, math, sys
import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

TEXTS = [
    "The wifi password for the Lisbon office is sardine-harbour-42.",
    "Band practice is now on Wednesdays near Ostkreuz.",
    "Bonjour à tous, la réunion est déplacée à jeudi après-midi.",
    "今日の会議は午後三時からです。",
    "ok 👍",
    "Summary of the interview: the candidate has six years of Rust experience and can start in January. " * 12,
    "a",
    "Grandma's lemon cake: 200g flour, 150g sugar, three eggs, zest of two lemons, bake 40 minutes at 180 degrees.",
]

erf = np.vectorize(math.erf)

def layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b

def embed(w, ids):
    ids = np.array(ids)
    L = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"]).astype(np.float64)
    H, D = 12, 384 // 12
    for i in range(6):
        p = "encoder.layer.%d." % i
        lin = lambda x, n: x @ w[p + n + ".weight"].T.astype(np.float64) + w[p + n + ".bias"]
        q = lin(x, "attention.self.query").reshape(L, H, D).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(L, H, D).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(L, H, D).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(D)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(L, H * D)
        x = layer_norm(x + lin(ctx, "attention.output.dense"),
                       w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
        h = lin(x, "intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = layer_norm(x + lin(h, "output.dense"), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    v = x.mean(0)  # one text at a time: no padding, so the mask mean is the plain mean
    return (v / np.linalg.norm(v)).tolist()

def main():
    d = sys.argv[1]
    w = load_file(d + "/model.safetensors")
    tok = Tokenizer.from_file(d + "/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(256)
    out = [{"text": t, "embedding": [round(x, 7) for x in embed(w, tok.encode(t).ids)]} for t in TEXTS]
    json.dump({"model": "sentence-transformers/all-MiniLM-L6-v2", "items": out}, sys.stdout)

if __name__ == "__main__":
    main()
