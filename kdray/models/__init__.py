"""Models: the registry (``MODELS``), the architectures, feature taps and checkpoints.

Importing this package registers every architecture.
"""
from kdray.models import cifar, hf, hf_lm, small, timm_zoo, torchvision_zoo  # noqa: F401  (registers the architectures)
from kdray.models.checkpoint import (
    Teacher,
    load_record,
    model_from_record,
    model_record,
    save_model,
    weights_digest,
)
from kdray.models.taps import FeatureTaps, LayerNotFound, check_layers, layer_names
from kdray.models.zoo import MODELS, Classifier, ModelSpec, Preprocess, build_model, register_model, set_layout, unwrap

__all__ = [
    "MODELS",
    "Classifier",
    "FeatureTaps",
    "LayerNotFound",
    "ModelSpec",
    "Preprocess",
    "Teacher",
    "build_model",
    "check_layers",
    "layer_names",
    "load_record",
    "model_from_record",
    "model_record",
    "register_model",
    "save_model",
    "set_layout",
    "unwrap",
    "weights_digest",
]
