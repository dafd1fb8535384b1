"""What ``student.quantize: int8`` buys at serving time: each student's latency as kdray measures it (batch 1 and 64,
one thread, the smallest of three medians: :func:`kdray.models.cost.student_cost`), float against the int8 model kdray
delivers for the same network, side by side in one process.

    python benchmarks/bench_int8.py [--json results/int8.json]

The int8 side is built as a run builds it (fake quantisation inserted, a batch of real samples through it, converted);
its weights are untrained, which does not change what a forward costs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdray.config import DatasetConfig
from kdray.data import load_dataset
from kdray.models import build_model
from kdray.models.cost import student_cost
from kdray.models.quantize import convert_int8, example_input, prepare_int8

CASES = [  # (data set, student, options)
    ("mnist1d", "mlp", {"hidden": [2048, 2048]}),
    ("mnist1d", "mnist1d_mlp", {}),
    ("mnist1d", "mnist1d_cnn", {}),
    ("digits", "digits_cnn", {}),
]


def measure(dataset: str, name: str, options: dict) -> dict:
    data = load_dataset(DatasetConfig(name=dataset))
    info, samples = data.info, data.train.head(64)
    torch.manual_seed(0)
    model = build_model(name, info.num_classes, info.preprocess(), options)
    qat = build_model(name, info.num_classes, info.preprocess(), options)
    qat.net = prepare_int8(qat.net, example_input(qat.preprocess))
    int8 = convert_int8(qat, samples)
    a, b = student_cost(model, samples), student_cost(int8, samples)
    return {"student": f"{name}{' ' + json.dumps(options) if options else ''} on {dataset}",
            "params": a["student_params"], "float_ms": a["latency_ms"], "int8_ms": b["latency_ms"],
            "float_b64_ms": a["latency_b64_ms"], "int8_b64_ms": b["latency_b64_ms"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    rows = [measure(*case) for case in CASES]
    print("| student | weights | float, batch 1 | int8, batch 1 | speed-up | float, batch 64 | int8, batch 64 | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['student']} | {r['params']:,} | {r['float_ms']:.3f} ms | {r['int8_ms']:.3f} ms | "
              f"**{r['float_ms'] / r['int8_ms']:.2f}×** | {r['float_b64_ms']:.3f} ms | {r['int8_b64_ms']:.3f} ms | "
              f"{r['float_b64_ms'] / r['int8_b64_ms']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
