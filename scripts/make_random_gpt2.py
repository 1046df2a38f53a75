"""A GPT-2-family checkpoint with random weights, for speed measurements only.

    python scripts/make_random_gpt2.py OUT [--layers 12] [--width 768] [--heads 12]

Writes OUT/config.json, OUT/model.safetensors (Hugging Face GPT-2 names and layout:
Conv1D weights [in, out], q/k/v fused in c_attn) and OUT/tokenizer.json (copied from
tests/fixtures/tiny-gpt2: 400 tokens; the embedding table keeps GPT-2's 50,257 rows so the
LM head costs what GPT-2's does). The defaults are GPT-2 small's shape. Weights are
N(0, 0.02²), biases N(0, 0.02²), LayerNorm gains 1 + N(0, 0.1²) and shifts N(0, 0.1²)
(non-zero, so a norm conversion has something to fold), seed 0. Its perplexity means
nothing; its speed and the exactness of `formers compress norm` do. Needs numpy and
safetensors only.
"""

import argparse
import json
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    d, v = a.width, a.vocab

    def normal(*shape, std=0.02, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    t = {"wte.weight": normal(v, d), "wpe.weight": normal(a.positions, d, std=0.01)}
    for i in range(a.layers):
        h = f"h.{i}."
        for ln in ["ln_1", "ln_2"]:
            t[h + ln + ".weight"] = normal(d, std=0.1, mean=1.0)
            t[h + ln + ".bias"] = normal(d, std=0.1)
        for name, (n_in, n_out) in {
            "attn.c_attn": (d, 3 * d),
            "attn.c_proj": (d, d),
            "mlp.c_fc": (d, 4 * d),
            "mlp.c_proj": (4 * d, d),
        }.items():
            t[h + name + ".weight"] = normal(n_in, n_out)
            t[h + name + ".bias"] = normal(n_out)
    t["ln_f.weight"] = normal(d, std=0.1, mean=1.0)
    t["ln_f.bias"] = normal(d, std=0.1)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ROOT / "tests/fixtures/tiny-gpt2/config.json").read_text())
    config.update(
        n_embd=d,
        n_layer=a.layers,
        n_head=a.heads,
        n_positions=a.positions,
        vocab_size=v,
        initializer_range=0.02,
    )
    (a.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(ROOT / "tests/fixtures/tiny-gpt2/tokenizer.json", a.out / "tokenizer.json")
    params = sum(x.size for x in t.values())
    print(f"{a.out}: {params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
