"""Tokens per second of one language-model distillation epoch: kdray's training loop against a plain Hugging Face loop
with the same loss.

Same data (``python_docs`` blocks), same models (a tiny Llama teacher and a half-depth student, Hugging Face
``LlamaForCausalLM``), same batch, the same AdamW (torch's fused kernel, which kdray uses, on both sides) and one
thread. Plain: the loop people write with transformers: teacher logits under ``no_grad``, student logits, 0.5 · CE +
T²·KL(teacher ‖ student) over the whole (B, T, V) logits, backward, step. kdray: ``train_run`` as an inline sweep
trial runs it (the chunked loss, the per-term sums, a metric sync and a checkpoint per epoch), with the teacher live,
and again reading the teacher's outputs from the shared cache (every token kept). Training tokens per second of an
epoch, validation excluded, median over rounds; the sides alternate.

    python benchmarks/bench_lm_epoch.py [--epochs 3] [--rounds 2] [--json results/lm_epoch.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdray.cache.tokens import build_token_cache  # noqa: E402
from kdray.config import DatasetConfig, RunConfig  # noqa: E402
from kdray.data import load_dataset  # noqa: E402
from kdray.models import Preprocess, build_model, model_record  # noqa: E402
from kdray.train.loop import train_run  # noqa: E402
from kdray.train.session import Session  # noqa: E402

DATA = {"name": "python_docs", "options": {"vocab_size": 1024, "seq_len": 64, "max_documents": 30}}
TEACHER = {"layers": 4, "hidden": 128, "heads": 4}
STUDENT = {"layers": 2, "hidden": 128, "heads": 4}
BATCH, LR, T, CE = 16, 2e-3, 1.0, 0.5


def teacher_record(vocab: int, seq: int) -> dict:
    torch.manual_seed(0)
    t = build_model("tiny_llama", vocab, Preprocess((seq,), passthrough=True), TEACHER)
    return model_record(t, model_name="tiny_llama", model_options=TEACHER, num_classes=vocab, dataset=DATA)


def plain_epochs(record: dict, epochs: int) -> list[float]:
    from kdray.models import model_from_record

    data = load_dataset(DatasetConfig.model_validate(DATA))
    x, y = data.train.x, data.train.y
    teacher = model_from_record(record).net.hf.eval()
    teacher.requires_grad_(False)
    torch.manual_seed(0)
    student = build_model("tiny_llama", data.info.num_classes, Preprocess((x.shape[1],), passthrough=True),
                          STUDENT).net.hf.train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR, fused=True)
    out = []
    for e in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(e))
        t0 = time.perf_counter()
        tokens = 0
        for s in range(0, len(x), BATCH):
            i = order[s:s + BATCH]
            xb, yb = x[i], y[i]
            with torch.no_grad():
                zt = teacher(input_ids=xb).logits
            zs = student(input_ids=xb).logits
            vocab = zs.shape[-1]
            ce = F.cross_entropy(zs.reshape(-1, vocab), yb.reshape(-1))
            kl = F.kl_div(F.log_softmax(zs.reshape(-1, vocab) / T, -1), F.log_softmax(zt.reshape(-1, vocab) / T, -1),
                          reduction="batchmean", log_target=True) * T * T
            loss = CE * ce + kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tokens += yb.numel()
        out.append(tokens / (time.perf_counter() - t0))
    return out


def kdray_epochs(record: dict, epochs: int, cache: object = None) -> list[float]:
    cfg = RunConfig.model_validate({
        "dataset": DATA, "teacher": {"checkpoint": "unused.pt"},
        "student": {"name": "tiny_llama", "options": STUDENT},
        "knowledge": [{"type": "tkd", "divergence": "fkl", "temperature": T}], "ce_weight": CE,
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "adamw", "lr": LR, "scheduler": "none"}})
    session = Session(checkpoint_root=tempfile.mkdtemp())
    train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [record], "teacher_cache": cache}, session)
    return [r["tokens_per_s"] for r in session.reports]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(DatasetConfig.model_validate(DATA))
    record = teacher_record(data.info.num_classes, data.train.x.shape[1])
    cache, _ = build_token_cache([record], data, [], 2**31, torch.device("cpu"), want_k=None)
    plain, kd, cached = [], [], []
    for _ in range(args.rounds):  # alternate, first epoch of each is a warm-up
        plain += plain_epochs(record, args.epochs)[1:]
        kd += kdray_epochs(record, args.epochs)[1:]
        cached += kdray_epochs(record, args.epochs, cache)[1:]
        torch.set_num_threads(args.threads)  # train_run sets its own; the plain loop gets the same again
    p, k, c = statistics.median(plain), statistics.median(kd), statistics.median(cached)
    row = {"train_tokens": int((data.train.y != -100).sum()), "plain_tokens_per_s": p, "kdray_tokens_per_s": k,
           "ratio": k / p, "kdray_cached_tokens_per_s": c, "ratio_cached": c / p, "threads": args.threads}
    print("| teacher -> student (tkd fkl + 0.5 CE, batch 16 x 64 tokens) | plain HF loop | kdray | kdray / plain | "
          "kdray, teacher cached | cached / plain |")
    print("|---|---|---|---|---|---|")
    print(f"| tiny Llama 4x128 -> 2x128, V = {data.info.num_classes} | {p:,.0f} tokens/s | {k:,.0f} tokens/s | "
          f"**{k / p:.2f}x** | {c:,.0f} tokens/s | {c / p:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
