"""A causal-LM student as its users load it: a Hugging Face folder (``save_pretrained``) with the tokenizer of the data
it was trained on, logged and registered with MLflow's ``transformers`` flavour, and written by ``kdray best --export``.

``AutoModelForCausalLM.from_pretrained(folder)`` then gives the model kdray validated (the same weights and config;
its validation NLL is the recorded one) and ``AutoTokenizer.from_pretrained(folder)`` the tokenizer, so it generates
text with ``model.generate``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.models import model_from_record
from kdray.ray_setup import quiet_logger


def record_tokenizer(record: dict[str, Any]) -> Any:
    """The tokenizer of the data set a student record was trained on."""
    from kdray.config import DatasetConfig
    from kdray.data import describe_dataset
    from kdray.data.lm import load_tokenizer

    info = describe_dataset(DatasetConfig.model_validate(record["dataset"]))
    if not info.tokenizer:
        raise ValueError(f"data set {record['dataset'].get('name')!r} has no tokenizer to save with the model")
    return load_tokenizer(str(info.tokenizer))


def save_hf_folder(record: dict[str, Any], out_dir: str | Path, model: Any = None) -> Path:
    """The student of ``record`` as a Hugging Face folder with its tokenizer (and generation settings: its end of
    text, a padding id) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else model_from_record(record).eval()
    hf = model.net.hf
    tok = record_tokenizer(record)
    eos = tok.eos_token_id
    if eos is not None:
        hf.config.eos_token_id = eos
        hf.generation_config.eos_token_id = eos
        hf.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos
    from kdray.models.hf import quiet_transformers

    with quiet_transformers():  # no progress bars for one small folder
        hf.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def log_lm(model: Any, record: dict[str, Any], model_name: str) -> Any:
    """Log the student in the active MLflow run as a Hugging Face model with its tokenizer (task text-generation)
    and register it as a new version of ``model_name``; the model info."""
    import mlflow

    from kdray.models.hf import quiet_transformers

    tok = record_tokenizer(record)
    hf = model.net.hf
    if tok.eos_token_id is not None:
        hf.generation_config.eos_token_id = tok.eos_token_id
        hf.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # the flavour looks for a model card and a license on the hub: neither exists for a student trained here
    with quiet_logger("mlflow.transformers"), quiet_transformers():
        return mlflow.transformers.log_model(
            transformers_model={"model": hf, "tokenizer": tok}, name="student", task="text-generation",
            registered_model_name=model_name)


__all__ = ["log_lm", "record_tokenizer", "save_hf_folder"]
