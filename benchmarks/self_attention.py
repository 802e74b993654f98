"""Time and peak memory of surgeon's self-attention layers against plain bmm/softmax versions.

    .venv/bin/python benchmarks/self_attention.py            # 32², 64², 96² maps, C=256, batch 2
    .venv/bin/python benchmarks/self_attention.py --json out.json --sizes 32,64 --modules nl,ccnet

Each (module, implementation, size) runs in its own subprocess on CPU with 2 threads, in eval mode
under no_grad: one warm-up forward, then the peak-memory forward, then timed forwards (median).
The plain versions use the module's own weights and materialise the N×N (N = H·W) attention matrix
as the textbook formulas do; the max |diff| column checks that both compute the same thing.

Peak memory is the growth of the process's resident set during one forward: the kernel's RSS
high-water mark (VmHWM) is reset through /proc/self/clear_refs just before it and read right after,
minus the RSS at the reset (glibc's mmap threshold is pinned at 128 KiB, so tensors are mapped
and unmapped as they live and die). It counts everything the forward touches (tensors, allocator caches,
oneDNN scratch), not only tensor bytes. Where the reset is not allowed, the subprocess skips the
warm-up and reports the rise of getrusage's ru_maxrss over the RSS before the forward instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

CHANNELS, BATCH, THREADS = 256, 2, 2
SIZES = (32, 64, 96)
MODULES = ("nl", "danet", "ccnet", "ema", "aaconv")
REPEATS = {32: 5, 64: 3, 96: 2}


# -- the plain versions: explicit N×N matrices, bmm and softmax -------------------------------------
def plain_nl(m, x):
    b, _, h, w = x.shape
    th, ph, g = m.theta(x).flatten(2), m.phi(x).flatten(2), m.g(x).flatten(2)
    attn = torch.softmax(torch.bmm(th.transpose(1, 2), ph), -1)  # (B, N, N)
    y = torch.bmm(g, attn.transpose(1, 2)).view(b, -1, h, w)
    return x + m.norm(m.z(y))


def plain_danet(m, x):
    pam = m.position
    q, k, v = pam.query(x).flatten(2), pam.key(x).flatten(2), pam.value(x).flatten(2)
    attn = torch.softmax(torch.bmm(q.transpose(1, 2), k), -1)  # (B, N, N)
    p = torch.bmm(v, attn.transpose(1, 2)).view_as(x)
    f = x.flatten(2)
    c = torch.bmm(torch.softmax(torch.bmm(f, f.transpose(1, 2)), -1), f).view_as(x)
    return x + pam.gamma * p + m.channel.gamma * c


def plain_ccnet(m, x):
    h, w = x.shape[-2:]
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    outside = (rows[:, None] != rows[None]) & (cols[:, None] != cols[None])  # (N, N): off the cross
    for _ in range(m.recurrence):
        q, k, v = m.query(x).flatten(2), m.key(x).flatten(2), m.value(x).flatten(2)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k).masked_fill(outside, float("-inf")), -1)
        x = x + m.gamma * torch.bmm(v, attn.transpose(1, 2)).view_as(x)
    return x


def plain_ema(m, x):
    # the official code's shape of computation: bmm's over (B, N, K) responsibilities, all in one go
    b, c, h, w = x.shape
    f = m.conv_in(x).view(b, c, h * w)
    mu = m.bases.repeat(b, 1, 1)
    for _ in range(m.num_iters):
        z = torch.softmax(torch.bmm(f.transpose(1, 2), mu), 2)
        z_ = z / (1e-6 + z.sum(1, keepdim=True))
        mu = torch.bmm(f, z_)
        mu = mu / (1e-6 + mu.norm(dim=1, keepdim=True))
    y = torch.relu(torch.bmm(mu, z.transpose(1, 2)).view(b, c, h, w))
    return x + m.norm(m.conv_out(y))


def plain_aaconv(m, x):
    # the paper's formulation: per head an (N, N) content + relative-position logit matrix (relative logits
    # gathered into N×N as in the paper's rel_to_abs), softmax, bmm with the values
    b, _, h, w = x.shape
    if m.rel_w is None:  # sized on the first forward, as the module itself does
        m.init_relative(h, w)
    q, k, v = torch.split(m.qkv(x), [m.dk, m.dk, m.dv], dim=1)
    dkh, dvh, n = m.dk // m.heads, m.dv // m.heads, h * w
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    dr = rows[None, :] - rows[:, None] + h - 1  # (N, N): key row − query row, shifted
    dc = cols[None, :] - cols[:, None] + w - 1
    outs = []
    for i in range(m.heads):
        qi = q[:, i * dkh:(i + 1) * dkh].flatten(2).transpose(1, 2) * dkh ** -0.5  # (B, N, d)
        logits = torch.bmm(qi, k[:, i * dkh:(i + 1) * dkh].flatten(2))  # (B, N, N)
        logits = logits + torch.gather(qi @ m.rel_h.T, 2, dr.expand(b, n, n))
        logits = logits + torch.gather(qi @ m.rel_w.T, 2, dc.expand(b, n, n))
        vi = v[:, i * dvh:(i + 1) * dvh].flatten(2)
        outs.append(torch.bmm(vi, torch.softmax(logits, -1).transpose(1, 2)).view(b, dvh, h, w))
    return torch.cat([m.conv(x), m.proj(torch.cat(outs, 1))], 1)


PLAIN = {"nl": plain_nl, "danet": plain_danet, "ccnet": plain_ccnet, "ema": plain_ema, "aaconv": plain_aaconv}


def build(name: str):
    from surgeon.layers.augmented import AAConv2d
    from surgeon.layers.self_attention import CrissCrossAttn, DualAttention, EMAUnit, NonLocal2d

    if name == "aaconv":  # C_out = C, the paper's κ = 2υ = 0.2, 8 heads, relative logits
        return AAConv2d(CHANNELS).eval()
    m = {"nl": NonLocal2d, "danet": DualAttention, "ccnet": CrissCrossAttn, "ema": EMAUnit}[name](CHANNELS)
    with torch.no_grad():  # every path contributes, as after training
        for pname, p in m.named_parameters():
            if pname.endswith("gamma") or pname == "norm.weight":
                p.fill_(0.5)
    return m.eval()


# -- one case, in a subprocess ------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(name: str, impl: str, size: int, repeats: int) -> dict:
    import resource

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    m = build(name)
    x = torch.randn(BATCH, CHANNELS, size, size)
    fn = m if impl == "surgeon" else (lambda t: PLAIN[name](m, t))
    with torch.no_grad():
        can_reset = _reset_peak()
        if can_reset:
            fn(x)  # warm-up: thread pools, allocator, kernels
            _reset_peak()
            before = _status_kb("VmRSS")
            y = fn(x)
            peak_kb = _status_kb("VmHWM") - before
            method = "VmHWM reset"
        else:
            before = _status_kb("VmRSS")
            y = fn(x)
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            method = "ru_maxrss"
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        diff = None
        if impl == "surgeon" and size <= 64:  # the plain version's own result, for the diff column
            diff = float((y - PLAIN[name](m, x)).abs().max())
    return {"module": name, "impl": impl, "size": size, "ms": 1e3 * statistics.median(times),
            "peak_mb": max(peak_kb, 0) / 1024, "max_abs_diff": diff, "memory_method": method}


def _subprocess(name: str, impl: str, size: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--case", f"{name},{impl},{size},{repeats}"]
    # a fixed mmap threshold turns off glibc's adaptive one, which after the warm-up would serve big
    # tensors from heap pages that are already resident and hide them from the high-water mark
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"module": name, "impl": impl, "size": size, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> None:
    header = f"Self-attention forward, CPU, {THREADS} threads, batch {BATCH}, {CHANNELS} channels, eval, no_grad"
    lines = [("module", "map", "impl", "time ms", "peak MB", "max|diff|")]
    for r in rows:
        if "error" in r:
            lines.append((r["module"], f"{r['size']}²", r["impl"], "error", " ".join(r["error"]), ""))
            continue
        diff = "" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"
        lines.append((r["module"], f"{r['size']}²", r["impl"], f"{r['ms']:.1f}", f"{r['peak_mb']:.1f}", diff))
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=header, title_justify="left")
        for i, col in enumerate(lines[0]):
            t.add_column(col, justify="left" if i < 3 else "right")
        for row in lines[1:]:
            t.add_row(*row)
        Console().print(t)
    except ImportError:
        print(header)
        for row in lines:
            print("  ".join(f"{c:>10}" for c in row))
    methods = {r.get("memory_method") for r in rows if "memory_method" in r}
    print(f"peak MB: resident-set growth during one forward ({', '.join(sorted(methods))}); "
          "plain = explicit N×N bmm/softmax with the same weights; max|diff| checked up to 64².")
    print("time ms: median of {} forwards; load average at the end: {:.1f} (other processes share the "
          "CPU, so times are indicative)".format("/".join(f"{s}²: {n}" for s, n in REPEATS.items()),
                                                 os.getloadavg()[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="feature-map sides, e.g. 32,64,96")
    ap.add_argument("--modules", default=",".join(MODULES), help=f"subset of {','.join(MODULES)}")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE ('-' for stdout)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        name, impl, size, repeats = args.case.split(",")
        print(json.dumps(run_case(name, impl, int(size), int(repeats))))
        return
    rows = []
    for size in map(int, args.sizes.split(",")):
        for name in args.modules.split(","):
            for impl in ("surgeon", "plain"):
                print(f"… {name} {impl} {size}²", file=sys.stderr, flush=True)
                rows.append(_subprocess(name, impl, size, REPEATS.get(size, 2)))
    if args.json == "-":
        print(json.dumps(rows, indent=2))
    else:
        _table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
