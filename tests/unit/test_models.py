"""Every registered model builds, runs and exposes its taps; teachers stay frozen; checkpoints round-trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdray.models import (
    MODELS,
    FeatureTaps,
    LayerNotFound,
    Preprocess,
    Teacher,
    build_model,
    load_record,
    model_from_record,
    model_record,
    save_model,
    weights_digest,
)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_runs_and_taps_its_default_layers(name):
    spec = MODELS.get(name)
    tokens = spec.example_dtype == "int64"  # a causal LM: token ids in, next-token logits at every position out
    model = build_model(name, 7, Preprocess(spec.example_input, passthrough=tokens)).eval()
    net = model.net
    layers = list(net.kd_feature_layers) + [net.kd_embedding_layer]
    assert net.kd_feature_layers, f"{name} declares no default hint layers"
    taps = FeatureTaps(net, layers)
    x = torch.randint(0, 7, (2, *spec.example_input)) if tokens else torch.randn(2, *spec.example_input)
    with torch.no_grad():
        out = taps.run(model, x)
    assert out.logits.shape == ((2, *spec.example_input, 7) if tokens else (2, 7))
    assert set(out.features) == set(layers)
    assert all(v.shape[0] == 2 and torch.isfinite(v).all() for v in out.features.values())


def test_unknown_layer_fails_at_once_listing_valid_names():
    model = build_model("mnist1d_mlp", 10, Preprocess((1, 40)))
    with pytest.raises(LayerNotFound) as e:
        FeatureTaps(model.net, ["block9"])
    msg = str(e.value)
    assert "'block9' does not exist in mnist1d_mlp" in msg
    assert "block1" in msg and "block2" in msg and "fc" in msg


def test_taps_survive_in_place_relu_after_a_tapped_layer():
    model = build_model("resnet8", 10, Preprocess((3, 32, 32)))
    taps = FeatureTaps(model.net, ["layer1.0.bn1"])  # a ReLU(inplace=True) follows this BatchNorm
    out = taps.run(model, torch.randn(2, 3, 32, 32))
    assert (out.features["layer1.0.bn1"] < 0).any(), "the recorded BN output was overwritten by the ReLU"
    (out.logits.sum() + out.features["layer1.0.bn1"].sum()).backward()


class _ResidualAfterBN(nn.Module):
    """Like torchvision's BasicBlock: the tapped BatchNorm's output is modified in place afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.bn(x)
        out += 10.0  # `out += identity`
        return self.fc(out)


def test_taps_record_the_output_before_a_later_in_place_change():
    net = _ResidualAfterBN().eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = net.bn(x).clone()
    taps = FeatureTaps(net, ["bn"])
    out = taps.run(net, x)
    torch.testing.assert_close(out.features["bn"], expected)
    net.train()
    out = taps.run(net, x)  # with autograd: the recorded feature still backpropagates
    (out.logits.sum() + out.features["bn"].pow(2).sum()).backward()
    assert net.bn.weight.grad is not None and torch.isfinite(net.bn.weight.grad).all()


def test_preprocess_travels_inside_the_model():
    pre = Preprocess((1, 8, 8), 4.0, 2.0)
    x = torch.full((3, 64), 6.0)
    assert torch.allclose(pre(x), torch.ones(3, 1, 8, 8))


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path):
    model = build_model("mnist1d_cnn", 10, Preprocess((1, 40)))
    rec = model_record(model, model_name="mnist1d_cnn", model_options={}, num_classes=10,
                       dataset={"name": "mnist1d"}, metrics={"val_accuracy": 0.5})
    path = save_model(rec, tmp_path / "m.pt")
    loaded = model_from_record(load_record(path))  # torch.load(weights_only=True) inside
    x = torch.randn(4, 40)
    torch.testing.assert_close(loaded(x), model(x))
    assert not list(tmp_path.glob(".*tmp")), "atomic save left a temporary file"


def test_teacher_is_frozen_in_eval_and_ensembles_average_logits():
    a = build_model("test_mlp", 3, Preprocess((1, 16)))
    b = build_model("test_mlp", 3, Preprocess((1, 16)))
    t = Teacher([a, b])
    t.train()  # must stay in eval mode
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    t.tap(["block1"])
    x = torch.randn(5, 16)
    out = t(x)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, (a(x) + b(x)) / 2)
    assert out.features["block1"].shape == (5, 8)
    bn = Teacher([build_model("resnet8", 3, Preprocess((3, 32, 32)))])
    bn.train()  # a training loop calls train() on everything it holds
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.randn(4, 3, 32, 32) * 5 + 3)  # far from the initial running statistics
    for k, v in bn.state_dict().items():  # BatchNorm statistics of a frozen teacher do not move
        torch.testing.assert_close(v, before[k], msg=k)


@pytest.mark.parametrize("name,shape", [("test_mlp", (1, 16)), ("resnet8", (3, 32, 32))])  # resnet8: BatchNorm
def test_weights_digest_changes_with_the_weights(name, shape):
    m = build_model(name, 3, Preprocess(shape))
    rec = model_record(m, model_name=name, model_options={}, num_classes=3, dataset={})
    d1 = weights_digest([rec])
    assert weights_digest([rec]) == d1
    rec["state_dict"]["net.fc.bias"] = rec["state_dict"]["net.fc.bias"] + 1e-3
    assert weights_digest([rec]) != d1


def test_a_model_given_raw_uint8_images_predicts_as_on_the_scaled_images_it_was_trained_on():
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.data.loaders import to_float

    data = load_dataset(DatasetConfig(name="test_images"))
    raw = data.val.x[:8]
    assert raw.dtype == torch.uint8
    model = build_model("resnet8", data.info.num_classes, data.info.preprocess()).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(raw), model(to_float(raw.clone())))
