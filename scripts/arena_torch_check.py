#!/usr/bin/env python3
"""PyTorch re-run of formers' lite-arena vanilla classifier on formers' own data files: does
the reference framework learn a lite task that formers does not (a bug in formers), or not
either (the model and recipe)?

    formers arena data retrieval --split train --out DIR/ret_train.tsv   # and --split test
    formers arena data pathfinder --split train --out DIR/pf_train.tsv    # and test (5,000 rows;
                                                   # longer runs cycle them unless --pf-train)
    formers arena data text --split train --out DIR/text_train.tsv        # and test
    python3 scripts/arena_torch_check.py --data DIR --task retrieval|pathfinder|text --steps N

Model: the architecture of scripts/bench_train_torch.py (imported from there):
byte/gray-value vocab 256, learned positions (256), d_model 64, 4 heads, 2 pre-LN layers,
MLP 4x GELU, final LayerNorm, mean pooling over tokens, linear classifier. For retrieval,
formers' matching head: the two 128-byte documents encoded apart by that stack (positions
128), the pooled u, v classified by a linear layer on [u, v, u*v, |u-v|].
Recipe: AdamW lr 2e-3, betas (0.9, 0.99), eps 1e-8, wd 0.01 on rank>=2 params; linear
warm-up 10% of steps then cosine to 10% of peak (formers' lr_at); grad clip 1.0; batch 16.
Data:
  retrieval: ret_{train,test}.tsv (label id1 id2 text1 text2, escaped) -> text1[:128]++text2[:128]
             bytes; train cycles the pairs of the file, reshuffled every epoch.
  pathfinder: pf_{train,test}.tsv (header; label\\tp0..p255); batch k = rows 16k..16k+15
             (fresh examples in order; cycles if the file is shorter).
  text:      text_{train,test}.tsv (header; label\\ttext) -> 256 bytes; shuffled epochs.
All sequences are exactly 256 long here (no padding), checked at load.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_torch import Model  # noqa: E402

D = "./"  # the --data directory, with a trailing slash


def unescape(s: bytes) -> bytes:
    out, i = bytearray(), 0
    m = {ord("\\"): b"\\", ord("t"): b"\t", ord("n"): b"\n", ord("r"): b"\r"}
    while i < len(s):
        c = s[i]
        if c == 0x5C and i + 1 < len(s) and s[i + 1] in m:
            out += m[s[i + 1]]
            i += 2
        else:
            out.append(c)
            i += 1
    return bytes(out)


def load(task, split, pf_train=None):
    xs, ys = [], []
    if task == "retrieval":
        with open(D + f"ret_{split}.tsv", "rb") as f:
            for line in f:
                parts = line.rstrip(b"\n").split(b"\t")
                assert len(parts) == 5, len(parts)
                lab = int(float(parts[0]))
                ids = list(unescape(parts[3])[:128]) + list(unescape(parts[4])[:128])
                xs.append(ids)
                ys.append(lab)
    elif task == "pathfinder":
        path = pf_train if (split == "train" and pf_train) else D + f"pf_{split}.tsv"
        with open(path) as f:
            assert f.readline().startswith("Target")
            for line in f:
                lab, pix = line.rstrip("\n").split("\t")
                xs.append([int(p) for p in pix.split()])
                ys.append(int(lab))
    elif task == "text":
        with open(D + f"text_{split}.tsv", "rb") as f:
            assert f.readline().startswith(b"Target")
            for line in f:
                lab, txt = line.rstrip(b"\n").split(b"\t", 1)
                xs.append(list(unescape(txt)[:256]))
                ys.append(int(lab))
    lens = {len(x) for x in xs}
    assert lens == {256}, f"{task}/{split}: lengths {sorted(lens)[:5]} (padding not handled)"
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


class TwoTowers(torch.nn.Module):
    """formers' `matching` head: each half of the input encoded alone, then
    [u, v, u*v, |u-v|] -> linear."""

    def __init__(self, c):
        super().__init__()
        self.enc = Model({**c, "max_len": c["max_len"] // 2})
        self.enc.head = torch.nn.Identity()
        self.proj = torch.nn.Linear(4 * c["d"], c["head"]["n_classes"])

    def forward(self, x):
        b, n = x.shape
        h = self.enc(x.reshape(2 * b, n // 2)).reshape(b, 2, -1)
        u, v = h[:, 0], h[:, 1]
        return self.proj(torch.cat([u, v, u * v, (u - v).abs()], -1))


def lr_at(step, total, peak, warmup, min_ratio):
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=".", help="directory of the TSV files (see above)")
    ap.add_argument("--task", required=True, choices=["retrieval", "pathfinder", "text"])
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pf-train", default=None, help="Pathfinder train TSV (default pf_train.tsv)")
    a = ap.parse_args()
    global D
    D = os.path.join(a.data, "")
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)

    xtr, ytr = load(a.task, "train", a.pf_train)
    xte, yte = load(a.task, "test")
    n_classes = 3 if a.task == "text" else 2
    print(f"task={a.task} steps={a.steps} train={len(ytr)} test={len(yte)} "
          f"train label mean={ytr.float().mean():.3f} test label counts={torch.bincount(yte).tolist()}", flush=True)

    c = {"d": 64, "heads": 4, "layers": 2, "causal": False, "max_len": 256, "vocab": 256,
         "position": "learned", "head": {"kind": "classification", "n_classes": n_classes,
                                         "pooling": "mean"},
         "final_norm": True, "attn_bias": True, "hidden": 256, "activation": "gelu",
         "mlp_bias": True, "eps": 1e-5}
    model = Model(c) if a.task != "retrieval" else TwoTowers(c)
    ps = list(model.parameters())
    print("params", sum(p.numel() for p in ps), flush=True)
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.99), eps=1e-8)
    warmup = max(a.steps // 10, 1)
    B = 16
    g = torch.Generator().manual_seed(a.seed)
    order, pos = None, 0

    def batch(k):
        nonlocal order, pos
        n = len(ytr)
        if a.task == "pathfinder":
            idx = torch.arange(B * k, B * k + B) % n
            return xtr[idx], ytr[idx]
        if order is None or pos + B > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + B]
        pos += B
        return xtr[idx], ytr[idx]

    losses, t0 = [], time.time()
    model.train()
    for step in range(a.steps):
        lr = lr_at(step, a.steps, a.lr, warmup, 0.1)
        for gr in opt.param_groups:
            gr["lr"] = lr
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == a.steps:
            w = losses[-(((step) % 100) + 1):]
            print(f"step {step + 1:5d} lr {lr:.2e} mean train loss (last {len(w)}) {sum(w) / len(w):.4f} "
                  f"[{time.time() - t0:.0f}s]", flush=True)

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yte), 100):
            correct += (model(xte[i:i + 100]).argmax(-1) == yte[i:i + 100]).sum().item()
        tr_idx = torch.arange(min(len(ytr), 1000))
        tr_acc = (model(xtr[tr_idx]).argmax(-1) == ytr[tr_idx]).float().mean().item()
    final = losses[-100:]
    print(f"RESULT task={a.task} steps={a.steps} seed={a.seed} test_acc={100 * correct / len(yte):.2f}% "
          f"({correct}/{len(yte)}) final100_loss={sum(final) / len(final):.4f} "
          f"train_acc(first {len(tr_idx)})={100 * tr_acc:.2f}%", flush=True)


if __name__ == "__main__":
    main()
