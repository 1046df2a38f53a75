#!/usr/bin/env python3
"""Training-step speed of PyTorch (CPU) on the model of a formers config: the baseline of
`formers bench train --torch`.

    python scripts/bench_train_torch.py --config RESOLVED.json --lengths 256,512,1024 \\
        --batch 4 --threads 2 --warmup 3 --steps 10 [--params N] [--json OUT]

--config is a resolved formers run config as JSON, `{"model": {...}, "train": {...}}` with
every key present (what `formers bench train` writes for each length). The script builds the
same architecture for the subset of formers these benchmarks use, and refuses (exit 1, with
the key) anything else rather than timing a different model:

  - input: bytes or tokens; positions: learned (a max_len table), sinusoidal or none;
  - n_layers identical pre-LN blocks (no per-layer overrides): LayerNorm → exact multi-head
    softmax attention (separate q, k, v, o projections, F.scaled_dot_product_attention,
    causal when the model is) → residual; LayerNorm → MLP (d → hidden → d, GELU, GELU-tanh
    or ReLU) → residual; no dropout;
  - an optional final LayerNorm, then an LM head (tied to the embeddings, or a bias-free
    linear) or a classifier (mean or first-token pooling, linear with bias);
  - cross-entropy, backward, gradient clipping to train.clip_norm (when > 0), AdamW with
    train.lr, betas, eps and decoupled weight decay on parameters of rank >= 2 (fused when
    this torch has the fused CPU kernel), train.grad_accum micro-batches per step.

One step runs on a random batch (token ids and targets from a seeded torch.Generator, drawn
inside the step as formers draws its batch). After --warmup untimed steps, --steps steps are
timed; the median gives steps_per_s. --params N asserts the parameter count equals formers'.

Each length is measured in its own python process (the script runs itself once per length
when given several), so peak_rss_bytes (VmHWM) is that length's. base_rss_bytes is the
resident memory once the model and optimizer are built, before the first step. Prints one
JSON object per length, shaped like formers' rows with "impl": "pytorch".
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


class Unsupported(Exception):
    pass


def need(cond, key, msg):
    if not cond:
        raise Unsupported(f"`{key}`: {msg}")


def only_keys(obj, at, keys):
    extra = sorted(set(obj) - set(keys))
    need(not extra, f"{at}.{extra[0]}" if extra else at, "a key this script does not know")


def parse_model(m):
    """The architecture as plain values, or Unsupported naming the first key it cannot build."""
    only_keys(
        m,
        "model",
        [
            "d_model", "n_heads", "n_layers", "causal", "max_len", "input", "position", "head",
            "final_norm", "embed_dropout", "type_vocab_size", "embed_norm", "residual",
            "defaults", "layers",
        ],
    )
    d, h = m["d_model"], m["n_heads"]
    need(d % h == 0, "model.n_heads", "does not divide d_model")
    inp = m["input"]
    if inp["kind"] == "bytes":
        vocab = 256
    else:
        need(inp["kind"] == "tokens", "model.input.kind", f"`{inp['kind']}` is not implemented")
        vocab = inp["vocab_size"]
    pos = m.get("position", {"kind": "learned"})["kind"]
    need(pos in ("learned", "sinusoidal", "none"), "model.position", f"`{pos}` is not implemented")
    head = m["head"]
    if head["kind"] == "lm":
        head = {"kind": "lm", "tied": head.get("tied", True)}
    else:
        need(head["kind"] == "classification", "model.head", f"`{head['kind']}` is not implemented")
        need(head["pooling"] in ("mean", "first"), "model.head.pooling", "not implemented")
    need(m.get("embed_dropout", 0) == 0, "model.embed_dropout", "dropout is not implemented")
    need(m.get("type_vocab_size", 0) == 0, "model.type_vocab_size", "token types are not implemented")
    need(not m.get("embed_norm", False), "model.embed_norm", "not implemented")
    need(m.get("residual", {"kind": "plain"})["kind"] == "plain", "model.residual", "only `plain` is implemented")
    need(not m.get("layers"), "model.layers", "per-layer overrides are not implemented")

    layer = m["defaults"]
    only_keys(layer, "model.defaults", ["mixer", "ffn", "norm", "placement", "dropout"])
    mixer = layer["mixer"]
    need(mixer["kind"] == "attention", "model.defaults.mixer", f"`{mixer['kind']}` is not implemented")
    only_keys(mixer, "model.defaults.mixer", ["kind", "q_chunk", "k_chunk", "bias", "shared_qk", "gate", "clip", "rank"])
    for key, off in (("shared_qk", False), ("gate", False), ("clip", None), ("rank", None)):
        need(mixer.get(key, off) in (off,), f"model.defaults.mixer.{key}", "not implemented")
    ffn = layer["ffn"]
    need(ffn["kind"] == "mlp", "model.defaults.ffn", f"`{ffn['kind']}` is not implemented")
    only_keys(ffn, "model.defaults.ffn", ["kind", "hidden", "activation", "bias", "rank"])
    act = ffn.get("activation", "gelu")
    need(act in ("gelu", "gelu_tanh", "relu"), "model.defaults.ffn.activation", f"`{act}` is not implemented")
    need(ffn.get("rank") is None, "model.defaults.ffn.rank", "low-rank MLPs are not implemented")
    norm = layer.get("norm", {"kind": "layer_norm", "eps": 1e-5})
    need(norm["kind"] == "layer_norm", "model.defaults.norm", f"`{norm['kind']}` is not implemented")
    need(layer.get("placement", "pre") == "pre", "model.defaults.placement", "only `pre` is implemented")
    need(layer.get("dropout", 0) == 0, "model.defaults.dropout", "dropout is not implemented")
    return {
        "d": d,
        "heads": h,
        "layers": m["n_layers"],
        "causal": bool(m.get("causal", False)),
        "max_len": m["max_len"],
        "vocab": vocab,
        "position": pos,
        "head": head,
        "final_norm": m.get("final_norm", True),
        "attn_bias": mixer.get("bias", True),
        "hidden": ffn.get("hidden") or 4 * d,
        "activation": act,
        "mlp_bias": ffn.get("bias", True),
        "eps": norm.get("eps", 1e-5),
    }


def parse_train(t):
    """The optimizer settings (schedule, evaluation and checkpoint keys do not change a step)."""
    only_keys(
        t,
        "train",
        [
            "steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay",
            "beta1", "beta2", "eps", "clip_norm", "grad_accum", "eval_every", "eval_batches",
            "checkpoint_every", "seed", "matformer_all",
        ],
    )
    return {
        "lr": t["lr"],
        "betas": (t["beta1"], t["beta2"]),
        "eps": t["eps"],
        "weight_decay": t["weight_decay"],
        "clip_norm": t["clip_norm"],
        "grad_accum": t["grad_accum"],
        "batch_size": t["batch_size"],
        "seed": t["seed"],
    }


def sinusoids(n, d):
    """formers' table: sin at even i, cos at odd i, frequency 10000^(-(i - i % 2) / d)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(d)
    freq = torch.pow(10000.0, -((i - i % 2).to(torch.float64)) / d)
    a = pos * freq
    return torch.where(i % 2 == 0, a.sin(), a.cos()).to(torch.float32)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d"]
        self.heads, self.causal = c["heads"], c["causal"]
        self.norm1 = nn.LayerNorm(d, eps=c["eps"])
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=c["attn_bias"]) for _ in range(4))
        self.norm2 = nn.LayerNorm(d, eps=c["eps"])
        self.up = nn.Linear(d, c["hidden"], bias=c["mlp_bias"])
        self.down = nn.Linear(c["hidden"], d, bias=c["mlp_bias"])
        self.act = {
            "gelu": F.gelu,
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
            "relu": F.relu,
        }[c["activation"]]

    def forward(self, x):
        b, n, d = x.shape
        y = self.norm1(x)
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(
            split(self.q(y)), split(self.k(y)), split(self.v(y)), is_causal=self.causal
        )
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down(self.act(self.up(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d"]
        self.c = c
        self.embed = nn.Embedding(c["vocab"], d)
        if c["position"] == "learned":
            self.pos = nn.Parameter(torch.randn(c["max_len"], d) * 0.02)
        elif c["position"] == "sinusoidal":
            self.register_buffer("pos", sinusoids(c["max_len"], d), persistent=False)
        else:
            self.pos = None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["layers"]))
        self.final_norm = nn.LayerNorm(d, eps=c["eps"]) if c["final_norm"] else None
        head = c["head"]
        if head["kind"] == "lm":
            self.head = None if head["tied"] else nn.Linear(d, c["vocab"], bias=False)
        else:
            self.head = nn.Linear(d, head["n_classes"], bias=True)

    def forward(self, ids):
        n = ids.shape[1]
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos[:n]
        for blk in self.blocks:
            x = blk(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.c["head"]["kind"] == "lm":
            return x @ self.embed.weight.t() if self.head is None else self.head(x)
        pooled = x.mean(1) if self.c["head"]["pooling"] == "mean" else x[:, 0]
        return self.head(pooled)


def status_bytes(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(c, t, length, batch, warmup, steps, params):
    torch.manual_seed(t["seed"])
    model = Model(c)
    count = sum(p.numel() for p in model.parameters())
    if params is not None and count != params:
        raise SystemExit(
            f"bench_train_torch.py: the PyTorch model has {count} parameters, formers' has {params}: "
            "not the same architecture"
        )
    ps = list(model.parameters())
    groups = [
        {"params": [p for p in ps if p.dim() >= 2], "weight_decay": t["weight_decay"]},
        {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0},
    ]
    kw = dict(lr=t["lr"], betas=t["betas"], eps=t["eps"])
    try:
        opt, adamw = torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
        opt, adamw = torch.optim.AdamW(groups, **kw), "default"
    gen = torch.Generator().manual_seed(t["seed"])
    lm = c["head"]["kind"] == "lm"
    out = c["vocab"] if lm else c["head"]["n_classes"]
    accum = t["grad_accum"]

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(accum):
            ids = torch.randint(0, c["vocab"], (batch, length), generator=gen)
            target = torch.randint(0, out, (batch, length) if lm else (batch,), generator=gen)
            logits = model(ids)
            loss = F.cross_entropy(logits.reshape(-1, out), target.reshape(-1))
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"bench_train_torch.py: non-finite loss {value}")
            (loss / accum if accum > 1 else loss).backward()
        if t["clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(ps, t["clip_norm"])
        opt.step()

    base = status_bytes("VmRSS:") or 0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    seconds = times[len(times) // 2]
    peak = status_bytes("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": "pytorch",
        "length": length,
        "batch": batch,
        "steps_per_s": 1.0 / seconds,
        "seconds_per_step": seconds,
        "peak_rss_bytes": peak,
        "base_rss_bytes": base,
        "params": count,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "steps": steps,
        "torch": torch.__version__,
        "adamw": adamw,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="resolved formers run config (JSON)")
    ap.add_argument("--lengths", required=True, help="comma-separated, e.g. 256,512,1024")
    ap.add_argument("--batch", type=int, help="sequences per step [default: train.batch_size]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--params", type=int, help="formers' parameter count, asserted equal")
    ap.add_argument("--json", help="also write the rows to this file as a JSON array")
    args = ap.parse_args()

    with open(args.config, encoding="utf-8") as f:
        run = json.load(f)
    try:
        c = parse_model(run["model"])
        t = parse_train(run.get("train", {}))
    except Unsupported as e:
        raise SystemExit(f"bench_train_torch.py: {args.config}: {e}; refusing to time a different model")
    except KeyError as e:
        raise SystemExit(f"bench_train_torch.py: {args.config}: missing key {e}; pass a resolved config")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    batch = args.batch or t["batch_size"]
    if not lengths or min(lengths) < 1 or batch < 1 or args.steps < 1 or args.threads < 1:
        raise SystemExit("bench_train_torch.py: --lengths, --batch, --steps and --threads must be positive")
    for n in lengths:
        if n > c["max_len"]:
            raise SystemExit(f"bench_train_torch.py: length {n} is longer than model.max_len = {c['max_len']}")

    rows = []
    if len(lengths) == 1:
        torch.set_num_threads(args.threads)
        rows.append(measure(c, t, lengths[0], batch, args.warmup, args.steps, args.params))
        print(json.dumps(rows[-1]), flush=True)
    else:
        # One process per length, so each peak RSS is that length's own.
        for n in lengths:
            cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config]
            cmd += ["--lengths", str(n), "--batch", str(batch), "--threads", str(args.threads)]
            cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
            if args.params is not None:
                cmd += ["--params", str(args.params)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if out.returncode != 0:
                raise SystemExit(out.returncode)
            for line in out.stdout.splitlines():
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line, flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
