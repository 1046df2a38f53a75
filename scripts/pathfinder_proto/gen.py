"""Prototype Pathfinder-like generator: 4-connected pixel chains on an NxN grid.
Scene: two chains A, B of the same length L (pixels, ends included), no pixel of B within
8-neighbourhood of A, each chain 'thin' (a new cell touches (4-adj) only its predecessor).
dot1 = A[0]; label 1: dot2 = A[-1]; label 0: dot2 = the end of B whose Euclidean distance
to dot1 is within tol of |A[0]-A[-1]| (B is redrawn until one end matches).
Pixels: background 0, chain pixels path_gray, dots dot_gray (dots replace the chain ends).
Optional gaps: every `gap_every`-th interior chain pixel left at 0 (dashed).
Optional distractors: extra chains of length Ld, clear of A and B (8-neighbourhood).
"""
import random, math

N4 = [(0, 1), (1, 0), (0, -1), (-1, 0)]

def nb8(c):
    r, q = c
    return [(r + a, q + b) for a in (-1, 0, 1) for b in (-1, 0, 1)]

def walk(rng, N, L, forbid, straight=0.0, tries=50):
    for _ in range(tries):
        s = (rng.randrange(N), rng.randrange(N))
        if s in forbid:
            continue
        path, inpath, ok, heading = [s], {s}, True, None
        for _ in range(L - 1):
            cur = path[-1]
            cands = []
            for d in N4:
                n = (cur[0] + d[0], cur[1] + d[1])
                if not (0 <= n[0] < N and 0 <= n[1] < N) or n in inpath or n in forbid:
                    continue
                # thin: n must not 4-touch any path cell except cur
                if any((n[0] + e[0], n[1] + e[1]) in inpath and (n[0] + e[0], n[1] + e[1]) != cur for e in N4):
                    continue
                cands.append((d, n))
            if not cands:
                ok = False
                break
            if heading is not None and straight > 0 and rng.random() < straight and any(d == heading for d, _ in cands):
                d, n = next((d, n) for d, n in cands if d == heading)
            else:
                d, n = rng.choice(cands)
            heading = d
            path.append(n)
            inpath.add(n)
        if ok:
            return path
    return None

def dist(a, b):
    return math.hypot(a[0] - b[0], a[1] - b[1])

def scene(rng, N, L, tol=0.5, n_distr=0, Ld=3, straight=0.0):
    while True:
        A = walk(rng, N, L, set(), straight)
        if A is None:
            continue
        if rng.random() < 0.5:
            A = A[::-1]
        dA = dist(A[0], A[-1])
        forbid = set()
        for c in A:
            forbid.update(nb8(c))
        B = None
        for _ in range(200):
            b = walk(rng, N, L, forbid, straight, tries=5)
            if b is None:
                continue
            if abs(dist(A[0], b[0]) - dA) <= tol:
                B = b; break
            if abs(dist(A[0], b[-1]) - dA) <= tol:
                B = b[::-1]; break
        if B is None:
            continue
        for c in B:
            forbid.update(nb8(c))
        D = []
        for _ in range(n_distr):
            d = walk(rng, N, Ld, forbid, straight, tries=20)
            if d is None:
                continue
            D.append(d)
            for c in d:
                forbid.update(nb8(c))
        return A, B, D

def render(N, A, B, D, label, path_gray=128, dot_gray=255, gap_every=0, variant="dots", rng=None):
    img = [0] * (N * N)
    if variant == "cut":
        # dots always on A's two ends; one interior pixel removed from A (label 0) or from B (label 1)
        P = A if label == 0 else B
        cut = P[rng.randrange(1, len(P) - 1)]
        for p in [A, B] + D:
            for (r, q) in p:
                img[r * N + q] = path_gray
        img[cut[0] * N + cut[1]] = 0
        for (r, q) in (A[0], A[-1]):
            img[r * N + q] = dot_gray
        return img, dist(A[0], A[-1])
    for p in [A, B] + D:
        for i, (r, q) in enumerate(p):
            if gap_every and 0 < i < len(p) - 1 and i % gap_every == 0:
                continue
            img[r * N + q] = path_gray
    d1 = A[0]
    d2 = A[-1] if label == 1 else B[0]
    for (r, q) in (d1, d2):
        img[r * N + q] = dot_gray
    return img, dist(d1, d2)

def make(n, seed, N=8, L=5, tol=0.5, n_distr=0, Ld=3, path_gray=128, dot_gray=255, gap_every=0, straight=0.0, Lrange=0, variant='dots'):
    rng = random.Random(seed)
    X, Y, DD = [], [], []
    for _ in range(n):
        y = rng.randrange(2)
        LL = L + (rng.randint(-Lrange, Lrange) if Lrange else 0)
        A, B, D = scene(rng, N, LL, tol, n_distr, Ld, straight)
        img, dd = render(N, A, B, D, y, path_gray, dot_gray, gap_every, variant, rng)
        X.append(img); Y.append(y); DD.append(dd)
    return X, Y, DD

if __name__ == "__main__":
    X, Y, _ = make(4, 1, N=10, L=7, n_distr=2)
    for x, y in zip(X, Y):
        print("label", y)
        for r in range(10):
            print("".join({0: ".", 128: "o", 255: "@"}[v] for v in x[r * 10:(r + 1) * 10]))
