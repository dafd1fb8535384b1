"""Peak memory of a language model's distillation loss, naive against chunked, forward + backward.

Naive: the student's and the teacher's logits made whole, (B·T, V) each, then next-token CE + T²·KL(teacher ‖
student) and the backward (what a loss written on ``model(x).logits`` does). Chunked: kdray's ``token_sums``, the same
loss from the hidden states and the heads a chunk of tokens at a time, each chunk recomputed in the backward. Each
measurement runs in a fresh process (peak RSS is a high-water mark), after its inputs and weights are allocated:
the figure is what the loss adds. Both sides compute the same value (printed). Memory is measured with glibc's mmap
threshold fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``): by default glibc raises it after the first large free, keeps the
chunks' freed 16 MiB blocks in its heap and RSS then counts them as if live; seconds come from a second run with
glibc's defaults (the fixed threshold makes every allocation a fresh mapping, which slows small-tensor code).

    python benchmarks/bench_token_loss.py [--tokens 1024] [--hidden 256] [--json results/token_loss.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCABS = (32768, 151936)


def one(mode: str, vocab: int, tokens: int, hidden: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kdray.knowledge.token import TKD, LMHead, TokenStates, token_sums

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, generator=g)).requires_grad_()
    ht = torch.randn(1, tokens, hidden, generator=g)
    wt = 0.02 * torch.randn(vocab, hidden, generator=g)
    y = torch.randint(0, vocab, (1, tokens), generator=g)
    term = TKD("fkl", 1.0)
    (h.sum() + w.sum()).backward()  # the gradient buffers exist on both sides before the baseline
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "naive":
        zs = h[0] @ w.T
        with torch.no_grad():
            zt = ht[0] @ wt.T
        loss = F.cross_entropy(zs, y[0], reduction="sum") + term.per_token(zs, zt).sum()
    else:
        sums, _, _ = token_sums(TokenStates(h, LMHead(w)), TokenStates(ht, LMHead(wt)), y, [term])
        loss = sums.sum()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mode": mode, "vocab": vocab, "tokens": tokens, "hidden": hidden, "loss": float(loss.detach()),
            "peak_mib": (peak - base) / 1024, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--json")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.tokens, args.hidden)))
        return
    rows = []
    print("| V | B·T | H | naive peak | chunked peak | chunked / naive | naive s | chunked s | same loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for vocab in VOCABS:
        side = {}
        for mode in ("naive", "chunked"):
            runs = []
            for env in ({**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}, dict(os.environ)):
                out = subprocess.run([sys.executable, __file__, "--one", mode, str(vocab), "--tokens",
                                      str(args.tokens), "--hidden", str(args.hidden)], capture_output=True, text=True,
                                     check=True, env=env)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            side[mode] = {**runs[0], "seconds": runs[1]["seconds"], "peak_mib_glibc_default": runs[1]["peak_mib"]}
        n, c = side["naive"], side["chunked"]
        row = {"vocab": vocab, "tokens": args.tokens, "hidden": args.hidden, "naive_peak_mib": n["peak_mib"],
               "chunked_peak_mib": c["peak_mib"], "ratio": c["peak_mib"] / n["peak_mib"],
               "naive_s": n["seconds"], "chunked_s": c["seconds"], "naive_loss": n["loss"], "chunked_loss": c["loss"],
               "chunked_peak_mib_glibc_default": c["peak_mib_glibc_default"]}
        rows.append(row)
        same = abs(n["loss"] - c["loss"]) <= 1e-4 * abs(n["loss"])
        print(f"| {vocab:,} | {args.tokens} | {args.hidden} | {n['peak_mib']:.0f} MiB | {c['peak_mib']:.0f} MiB | "
              f"**{row['ratio']:.2f}** | {n['seconds']:.2f} | {c['seconds']:.2f} | {'yes' if same else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
