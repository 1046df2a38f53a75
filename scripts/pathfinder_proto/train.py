"""PyTorch prototype of the lite arena model on Pathfinder-like images: what makes the task
learnable within a few hundred steps (docs/experiments/arena-lite-tasks.md).

Data: either gen.py's 4-connected pixel chains (--N size, --L chain length, ...), generated
here, or files `formers arena data pathfinder` wrote (--rs PREFIX reads PREFIX_train.tsv and
PREFIX_test.tsv). Model: scripts/bench_train_torch.py's stack (d 64, 4 heads, 2 layers) with
PyTorch's default initialisation, or formers' GPT-2 one (--init02 1); positions learned 1-D
(--pos 1d), learned row + column (--pos 2d) or none (--pos none), optionally with a 2-D ALiBi
bias (--relbias alibi) or 2-D rotary positions of that base (--rope2d 10). Recipe: batch 16,
AdamW (betas 0.9/0.99, weight decay 0.01 on matrices), warm-up a tenth, cosine to a tenth,
clipping at 1.0. One thread. Prints and appends one JSON line per run (--results).

    python3 scripts/pathfinder_proto/train.py --N 12 --L 4 --pos none --rope2d 10 --tol 0.01
"""
import argparse, math, os, sys, time, json
import torch, torch.nn.functional as F
from torch import nn
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench_train_torch import Model
sys.path.insert(0, HERE)
import gen

ap = argparse.ArgumentParser()
ap.add_argument("--N", type=int, default=8); ap.add_argument("--L", type=int, default=5)
ap.add_argument("--Lrange", type=int, default=0)
ap.add_argument("--distr", type=int, default=0); ap.add_argument("--Ld", type=int, default=3)
ap.add_argument("--gap", type=int, default=0); ap.add_argument("--dot", type=int, default=255)
ap.add_argument("--tol", type=float, default=0.5); ap.add_argument("--variant", default="dots")
ap.add_argument("--straight", type=float, default=0.0)
ap.add_argument("--pos", default="1d"); ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--d", type=int, default=64); ap.add_argument("--relbias", default="none")
ap.add_argument("--steps", type=int, default=500); ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--rope2d", type=float, default=0.0)
ap.add_argument("--init02", type=int, default=0)
ap.add_argument("--results", default="pathfinder_proto.jsonl")
ap.add_argument("--seed", type=int, default=0); ap.add_argument("--tag", default=""); ap.add_argument("--rs", default="")
a = ap.parse_args()
torch.set_num_threads(1); torch.manual_seed(a.seed)
B = 16
gk = dict(N=a.N, L=a.L, n_distr=a.distr, Ld=a.Ld, gap_every=a.gap, dot_gray=a.dot, straight=a.straight, Lrange=a.Lrange, tol=a.tol, variant=a.variant)
t0 = time.time()
def rd(p, k):
    X, Y = [], []
    with open(p) as f:
        f.readline()
        for line in f:
            l, px = line.rstrip("\n").split("\t"); X.append([int(v) for v in px.split()]); Y.append(int(l))
            if len(X) == k: break
    return X, Y
if a.rs:
    Xtr, Ytr = rd(a.rs + "_train.tsv", B * a.steps); Xte, Yte = rd(a.rs + "_test.tsv", 1000)
    k = len(Xtr); Xtr = [Xtr[i % k] for i in range(B * a.steps)]; Ytr = [Ytr[i % k] for i in range(B * a.steps)]
else:
    Xtr, Ytr, _ = gen.make(B * a.steps, 1000 + a.seed, **gk)
    Xte, Yte, _ = gen.make(1000, 99999, **gk)
xtr, ytr = torch.tensor(Xtr), torch.tensor(Ytr); xte, yte = torch.tensor(Xte), torch.tensor(Yte)
tg = time.time() - t0
n = a.N * a.N
c = {"d": a.d, "heads": 4, "layers": a.layers, "causal": False, "max_len": n, "vocab": 256,
     "position": "learned" if a.pos == "1d" else "none", "head": {"kind": "classification", "n_classes": 2, "pooling": "mean"},
     "final_norm": True, "attn_bias": True, "hidden": 4 * a.d, "activation": "gelu", "mlp_bias": True, "eps": 1e-5}
model = Model(c)
if a.pos == "2d":
    model.prow = nn.Parameter(torch.randn(a.N, a.d) * 0.02); model.pcol = nn.Parameter(torch.randn(a.N, a.d) * 0.02)
    base_embed = model.embed
    class E(nn.Module):
        def __init__(s): super().__init__(); s.e = base_embed
        def forward(s, ids):
            p = (model.prow[:, None, :] + model.pcol[None, :, :]).reshape(n, -1)
            return s.e(ids) + p
    model.embed = E()
if a.relbias != "none":
    N_ = a.N
    rr = torch.arange(n) // N_; cc = torch.arange(n) % N_
    dr = rr[:, None] - rr[None, :]; dc = cc[:, None] - cc[None, :]
    idx = ((dr + N_ - 1) * (2 * N_ - 1) + (dc + N_ - 1))
    eu = torch.sqrt((dr.float() ** 2 + dc.float() ** 2))
    for blk in model.blocks:
        H = blk.heads
        tab = torch.zeros(H, (2 * N_ - 1) ** 2)
        if a.relbias.startswith("alibi"):
            offs = torch.stack(torch.meshgrid(torch.arange(-N_ + 1, N_), torch.arange(-N_ + 1, N_), indexing="ij"), -1).reshape(-1, 2).float()
            dd = offs.norm(dim=-1)
            for h, sl in enumerate([2.0, 1.0, 0.5, 0.0][:H]):
                tab[h] = -sl * dd
        blk.rel = nn.Parameter(tab, requires_grad=(a.relbias != "alibi_fixed"))
        def fwd(x, blk=blk):
            b, n_, d = x.shape
            y = blk.norm1(x)
            split = lambda t: t.view(b, n_, blk.heads, d // blk.heads).transpose(1, 2)
            bias = blk.rel[:, idx]
            att = F.scaled_dot_product_attention(split(blk.q(y)), split(blk.k(y)), split(blk.v(y)), attn_mask=bias[None])
            x = x + blk.o(att.transpose(1, 2).reshape(b, n_, d))
            return x + blk.down(blk.act(blk.up(blk.norm2(x))))
        blk.forward = fwd

if a.rope2d > 0:
    N_ = a.N
    rr = (torch.arange(n) // N_).float(); cc = (torch.arange(n) % N_).float()
    hd = a.d // 4; q4 = hd // 4
    fr = a.rope2d ** (-torch.arange(q4).float() * 2 / (hd // 2))
    ang = torch.cat([rr[:, None] * fr[None], cc[:, None] * fr[None]], -1)  # [n, hd/2]
    COS, SIN = ang.cos(), ang.sin()
    def rot(t):
        # t [b,h,n,hd]; pairs (i, i+hd/2)
        h1, h2 = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat([h1 * COS - h2 * SIN, h1 * SIN + h2 * COS], -1)
    for blk in model.blocks:
        def fwd(x, blk=blk):
            b, n_, d = x.shape
            y = blk.norm1(x)
            split = lambda t: t.view(b, n_, blk.heads, d // blk.heads).transpose(1, 2)
            att = F.scaled_dot_product_attention(rot(split(blk.q(y))), rot(split(blk.k(y))), split(blk.v(y)))
            x = x + blk.o(att.transpose(1, 2).reshape(b, n_, d))
            return x + blk.down(blk.act(blk.up(blk.norm2(x))))
        blk.forward = fwd
if a.init02:
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.dim() >= 2 and 'norm' not in name: prm.normal_(0, 0.02)
            elif name.endswith('bias'): prm.zero_()
ps = [p for p in model.parameters() if p.requires_grad]
groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.01}, {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.99), eps=1e-8)
warm = max(a.steps // 10, 1)
def lr_at(s):
    if s < warm: return a.lr * (s + 1) / warm
    pr = min((s - warm) / max(a.steps - warm, 1), 1.0)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * pr)))
def evaluate():
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
    model.train(); return acc
losses = []; t1 = time.time(); mid = {}
for s in range(a.steps):
    for g in opt.param_groups: g["lr"] = lr_at(s)
    x, y = xtr[B * s:B * s + B], ytr[B * s:B * s + B]
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(ps, 1.0); opt.step()
    losses.append(loss.item())
    if (s + 1) % 250 == 0 and s + 1 < a.steps:
        mid[s + 1] = evaluate()
acc = evaluate(); tt = time.time() - t1
fl = sum(losses[-100:]) / 100
r = dict(tag=a.tag, args=vars(a), test_acc=round(acc, 4), mid={k: round(v, 3) for k, v in mid.items()}, final_loss=round(fl, 4), train_s=round(tt, 1), gen_s=round(tg, 1))
print("RESULT", json.dumps(r), flush=True)
open(a.results, "a").write(json.dumps(r) + "\n")
