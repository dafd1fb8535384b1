"""A trained model on disk: architecture name, options, preprocessing and weights in one file.

The record holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs code from it. A teacher trained by
``kdray teacher`` and a student saved by ``kdray distill`` share this format, so a distilled student
can teach the next one.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdray.knowledge.base import TapOutputs
from kdray.models.lora import has_lora, merged_state_dict
from kdray.models.taps import FeatureTaps
from kdray.models.zoo import Classifier, Preprocess, build_model, unwrap

FORMAT = "kdray.model/1"
ENSEMBLE_RULES = ("mean", "fixed", "confidence")


def combine(logits: list[Tensor] | Tensor, rule: str = "mean", weights: list[float] | None = None) -> Tensor:
    """An ensemble's logits from its members' (a list of (B, C), or (M, B, C)): ``mean`` their average; ``fixed`` the
    average weighted by ``weights`` (normalised); ``confidence`` per sample, each member weighted by its top-class
    probability over the members' sum (a confident member counts more where it is confident). The weights are on
    the logits, as the mean always was (a weighted geometric mean of the members' distributions)."""
    z = torch.stack(list(logits)) if isinstance(logits, (list, tuple)) else logits
    z = z.float()
    if rule == "mean":
        total = z[0]
        for k in range(1, z.shape[0]):  # summed in order, as kdray always did: the same bits
            total = total + z[k]
        return total / z.shape[0]
    if rule == "fixed":
        w = torch.as_tensor(weights, dtype=z.dtype, device=z.device)
        w = (w / w.sum()).view(-1, *([1] * (z.dim() - 1)))
    elif rule == "confidence":
        c = torch.softmax(z, dim=-1).amax(-1)  # (M, B)
        w = (c / c.sum(0, keepdim=True))[..., None]
    else:
        raise ValueError(f"unknown ensemble rule {rule!r}; known: {', '.join(ENSEMBLE_RULES)}")
    return (w * z).sum(0)


def model_record(
    model: Classifier,
    *,
    model_name: str,
    model_options: dict[str, Any] | None,
    num_classes: int,
    dataset: dict[str, Any],
    metrics: dict[str, float] | None = None,
    config: dict[str, Any] | None = None,
    raw_input: dict[str, Any] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A self-contained, weights-only-loadable model record. ``raw_input`` ({shape, dtype}) is what the data
    set stores per sample (uint8 NCHW images, float rows): what an exported model is traced for. ``state_dict``:
    the model's weights when the model itself holds only a shard of them (FSDP: gathered by every rank first)."""
    model = unwrap(model)
    pre = model.preprocess
    options = dict(model_options or {})
    options.update(getattr(model.net, "kd_record_options", None) or {})
    return {
        "format": FORMAT,
        "model": model_name,
        "model_options": options,
        "num_classes": int(num_classes),
        "preprocess": {"shape": list(pre.shape), "mean": pre.mean.flatten().tolist(), "std": pre.std.flatten().tolist(),
                       "passthrough": bool(getattr(pre, "passthrough", False))},
        "dataset": dict(dataset),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "config": config or {},
        "raw_input": dict(raw_input) if raw_input else {"shape": list(pre.shape), "dtype": "float32"},
        # a LoRA student's adapters merged: the record loads into the plain model, without peft
        "state_dict": {k: v.detach().cpu() for k, v in (
            state_dict if state_dict is not None else merged_state_dict(model) if has_lora(model)
            else model.state_dict()).items()},
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_model(record: dict[str, Any], path: str | os.PathLike) -> str | Path:
    """Save a model record to a local path or a storage URI (``s3://...``), whole or not at all."""
    from kdray import storage

    if storage.is_remote(str(path)):
        buf = io.BytesIO()
        torch.save(record, buf)
        storage.write_bytes(str(path), buf.getvalue())
        return str(path)
    return atomic_torch_save(record, path)


def load_record(source: str | os.PathLike | dict[str, Any] | bytes) -> dict[str, Any]:
    """A model record from a path, raw bytes or an already loaded dict (always ``weights_only``)."""
    if isinstance(source, dict):
        record = source
    elif isinstance(source, (bytes, bytearray)):
        record = torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
    elif "://" in str(source):  # a storage URI: s3://bucket/teachers/x.pt
        from kdray import storage

        if not storage.exists(str(source)):
            raise FileNotFoundError(f"model checkpoint {source} does not exist")
        record = torch.load(io.BytesIO(storage.read_bytes(str(source))), map_location="cpu", weights_only=True)
    else:
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"model checkpoint {p} does not exist")
        record = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        what = source if not isinstance(source, (dict, bytes)) else "record"
        raise ValueError(f"{what} is not a kdray model checkpoint")
    return record


def model_from_record(record: dict[str, Any]) -> Classifier:
    pre = record["preprocess"]
    if record.get("module") is not None or record.get("pt2") is not None:  # an MLflow teacher: raw inputs
        from kdray.models.foreign import foreign_module

        return Classifier(Preprocess(tuple(pre["shape"]), passthrough=True), foreign_module(record))
    mean, std = pre["mean"], pre["std"]
    preprocess = Preprocess(tuple(pre["shape"]), mean if len(mean) > 1 else mean[0], std if len(std) > 1 else std[0],
                            passthrough=bool(pre.get("passthrough", False)))
    options = record.get("model_options") or {}
    if "hf_config" in options:
        # a Hugging Face model rebuilds from its record alone: no folder, no hub (the name is only a label)
        from kdray.models.hf_lm import rebuild

        net = rebuild(record["num_classes"], tuple(pre["shape"]), options)
        net.kd_model_name = record["model"]
        model = Classifier(preprocess, net)
    else:
        model = build_model(record["model"], record["num_classes"], preprocess,
                            {k: v for k, v in options.items() if k not in ("quantize", "quantize_backend")})
    quantized = bool(options.get("quantize"))
    if quantized:  # trained with fake quantisation: rebuilt so, then delivered as int8
        from kdray.models.quantize import example_input, prepare_int8

        model.net = prepare_int8(model.net, example_input(preprocess), options.get("quantize_backend"))
    model.load_state_dict(record["state_dict"])
    if quantized:
        from kdray.models.quantize import convert_int8

        return convert_int8(model)
    return model


def weights_digest(records: list[dict[str, Any]]) -> str:
    """A content hash of one or more models' weights: part of every teacher-cache key."""
    h = hashlib.sha256()
    for rec in records:
        h.update(rec["model"].encode())
        for k in sorted(rec["state_dict"]):
            t: Tensor = rec["state_dict"][k]
            h.update(k.encode())
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            # reshape(-1): 0-dim tensors (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Teacher(nn.Module):
    """The frozen teacher: eval mode, no gradients, never wrapped in DDP.

    An ensemble of checkpoints averages its members' logits (Hinton et al.'s original setting);
    feature taps read the first member, whose layer names the config refers to. A causal LM teacher is one model;
    its outputs are its hidden states and head, from which the loss makes logits a chunk at a time.
    """

    def __init__(self, members: list[Classifier], rule: str = "mean", weights: list[float] | None = None,
                 feature_member: int = 0) -> None:
        super().__init__()
        if not members:
            raise ValueError("a teacher needs at least one model")
        self.causal_lm = bool(getattr(members[0], "causal_lm", False))
        if self.causal_lm and len(members) > 1:
            raise ValueError("an ensemble of language-model teachers is not supported: give one checkpoint")
        if rule not in ENSEMBLE_RULES:
            raise ValueError(f"unknown ensemble rule {rule!r}; known: {', '.join(ENSEMBLE_RULES)}")
        self.members = nn.ModuleList(members)
        self.rule, self.weights, self.feature_member = rule, weights, int(feature_member)
        self.requires_grad_(False)
        self.eval()
        self.taps = FeatureTaps(self.feature_model.net, [])

    @property
    def feature_model(self) -> Classifier:
        """The member whose feature maps the feature knowledge taps (``ensemble.feature_member``)."""
        return self.members[self.feature_member]

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], rule: str = "mean", weights: list[float] | None = None,
                     feature_member: int = 0) -> "Teacher":
        return cls([model_from_record(r) for r in records], rule, weights, feature_member)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode (BatchNorm stats stay frozen)

    def tap(self, layers: list[str]) -> None:
        self.taps.remove()
        self.taps = FeatureTaps(self.feature_model.net, layers)

    @torch.no_grad()
    def member_outputs(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Each member's logits, and the taps of the feature member."""
        out = self.taps.run(self.feature_model, x, states=self.causal_lm)
        logits = [out.logits.float() if k == self.feature_member else m(x).float()
                  for k, m in enumerate(self.members)]
        return logits, out.features

    @torch.no_grad()
    def forward(self, x: Tensor) -> TapOutputs:
        """Logits and taps; a causal LM's ``logits`` are its hidden states and head (TokenStates); an ensemble's
        logits its members' combined by its rule (:func:`combine`)."""
        if len(self.members) == 1:
            return self.taps.run(self.members[0], x, states=self.causal_lm)
        logits, features = self.member_outputs(x)
        return TapOutputs(combine(logits, self.rule, self.weights), features)
