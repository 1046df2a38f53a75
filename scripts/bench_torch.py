#!/usr/bin/env python3
"""Sentence-embedding throughput of PyTorch + transformers, the baseline for formers.

    python scripts/bench_torch.py --model /work/models/all-minilm-l6-v2 \\
        --sentences data/sentences.txt --batch-sizes 1,32 --threads 2 [--json OUT]

Loads a BERT-family sentence-transformers directory with transformers.AutoModel
and AutoTokenizer (local files only, no network). For each batch size it runs one
warm-up batch, then embeds every sentence of the file in file order: tokenise
(padding to the longest in the batch, truncation to max_position_embeddings),
run the model under torch.inference_mode(), mean-pool over the attention mask
and L2-normalise (what sentence-transformers does for all-MiniLM-L6-v2).

Prints one JSON object per batch size. `seconds`/`sentences_per_s` include
tokenisation; `model_seconds`/`model_sentences_per_s` count only the forward
pass plus pooling. --json OUT also writes all results as a JSON array.
"""

import argparse
import json
import os
import time

import torch
import transformers
from transformers import AutoModel, AutoTokenizer


def embed(model, enc):
    out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def run(model, tok, sentences, batch_size, max_length):
    def tokenize(batch):
        return tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    embed(model, tokenize(sentences[:batch_size]))  # warm-up

    tok_s = model_s = 0.0
    tokens = padded = 0
    start = time.perf_counter()
    for i in range(0, len(sentences), batch_size):
        t0 = time.perf_counter()
        enc = tokenize(sentences[i : i + batch_size])
        t1 = time.perf_counter()
        embed(model, enc)
        t2 = time.perf_counter()
        tok_s += t1 - t0
        model_s += t2 - t1
        tokens += int(enc["attention_mask"].sum())
        padded += enc["attention_mask"].numel()
    total = time.perf_counter() - start
    n = len(sentences)
    return {
        "impl": "torch",
        "batch_size": batch_size,
        "sentences": n,
        "seconds": round(total, 4),
        "sentences_per_s": round(n / total, 2),
        "model_seconds": round(model_s, 4),
        "model_sentences_per_s": round(n / model_s, 2),
        "tokenize_seconds": round(tok_s, 4),
        "tokens": tokens,
        "padded_tokens": padded,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="sentence-transformers / BERT directory")
    ap.add_argument("--sentences", required=True, help="text file, one sentence per line")
    ap.add_argument("--batch-sizes", default="1,32", help="comma-separated, e.g. 1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results to this file as a JSON array")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with open(args.sentences, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModel.from_pretrained(args.model, local_files_only=True).eval()
    max_length = model.config.max_position_embeddings
    common = {
        "model": os.path.basename(os.path.normpath(args.model)),
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }

    results = []
    with torch.inference_mode():
        for bs in (int(x) for x in args.batch_sizes.split(",") if x.strip()):
            r = run(model, tok, sentences, bs, max_length)
            r.update(common)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
