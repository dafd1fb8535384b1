"""timm models by name: ``timm/<any timm.list_models() name>``, optionally with a pretrained tag.

``timm/resnet18`` builds ``timm.create_model("resnet18", num_classes=<data set's>, in_chans=<C>)`` with
random weights; ``options: {pretrained: true}`` loads timm's ImageNet weights from the Hugging Face Hub
(``timm/resnet18.a1_in1k`` picks a tag) and replaces the classifier for the data set's classes. timm is
imported only when a ``timm/`` name is used, so ``import kdray`` stays light without it.

Models whose pretrained config says ``fixed_input_size`` (ViT, Swin, MLP-Mixer...) are built for the data
set's image size (``img_size=(H, W)``, timm resamples position embeddings of pretrained weights) unless the
options give ``img_size``.

The KD layout is derived from timm's ``feature_info`` and the classifier head, generically:

* hint layers (``kd_feature_layers``): the stage outputs of ``feature_info``; where the reduction grows,
  the last module of each reduction from 4 on (the stride-2 stem is too shallow to hint); where it is
  constant (plain ViTs, ConvMixer), four evenly spaced blocks ending with the last. A name that is not a
  module is mapped to the close match with the same index (twins' ``block.0`` is ``blocks.0``) or
  dropped, one that is never called (a ModuleList) to its last child; when none remain, the children
  of ``stages``/``layers``/``blocks``/``features``.
* embedding layer (``kd_embedding_layer``): the representation the classifier sees. A shape-only probe
  (a replica on the meta device: no weights, no compute) hooks every module and walks back from the
  classifier over modules whose output is the classifier's input (up to 1x1 spatial dims), taking the
  first that computes something (not a dropout, identity or flatten), else the earliest of those (a
  ViT's class token, pooled in ``forward_head`` without a module, is first seen at ``fc_norm``), else
  the first such module inside the classifier (LeViT's ``head.bn``). Without a result (multi-head
  CrossViT, ``*_enc`` encoders without a classifier, a model the probe cannot run): the last
  ``SelectAdaptivePool2d``, else the last hint layer. The probe runs at timm's input size unless the
  model is built for the data's (``img_size``), where a small image's 1x1 stage output would look pooled.

====================== ================================================ ===================================
model                  hint layers                                      embedding layer, output
====================== ================================================ ===================================
resnet18               layer1, layer2, layer3, layer4                   global_pool (B, 512)
convnext_atto          stages.0, stages.1, stages.2, stages.3           head.norm (B, 320, 1, 1): the
                                                                        LayerNorm after the pooling
mobilenetv3_small_050  blocks.0, blocks.1, blocks.3, blocks.5           act2 (B, 1024, 1, 1): after the
                                                                        conv_head, not the 288-d pool
efficientnet_b0        blocks.1, blocks.2, blocks.4, blocks.6           global_pool (B, 1280)
vit_tiny_patch16_224   blocks.2, blocks.5, blocks.8, blocks.11 (tokens  fc_norm (B, 192): the class token
                       B x T x 192)                                     (an Identity with token pooling)
swin_tiny_patch4_...   layers.0 .. layers.3 (NHWC maps)                 head.global_pool (B, 768)
levit_128s             stages.0, stages.1, stages.2 (tokens)            head.bn (B, 384), in the classifier
mvitv2_tiny            stages.0 .. stages.3 (``block.N`` not modules)   head.drop (B, 768): the class token
twins_svt_small        blocks.0.1, blocks.1.1, blocks.2.9, blocks.3.3   head_drop (B, 512)
====================== ================================================ ===================================

Token and NHWC hint layers are what the model computes; hint knowledge between such a layer and a
(B, C, H, W) map gets the connector it infers (FitNet: flatten-linear) or needs explicit layers.
"""
from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kdray.models.zoo import MODELS, ModelSpec, set_layout

INSTALL_HINT = "pip install timm (or kdray[hub])"
SET_BY_KDRAY = ("num_classes", "in_chans")


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError(f"timm/ models need the timm package: {INSTALL_HINT}") from None
    return timm


@functools.lru_cache(maxsize=None)
def _names(pretrained: bool) -> tuple[str, ...]:
    """timm's architecture names, or its ``arch.tag`` names with weights (listed once: it takes ~50 ms)."""
    return tuple(_timm().list_models(pretrained=pretrained))


def _pretrained_cfg(name: str) -> dict[str, Any]:
    cfg = _timm().models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def resolve(rest: str) -> ModelSpec:
    """The ``ModelSpec`` for ``timm/<rest>``: checked against timm's names, nothing built or downloaded."""
    _timm()
    arch, _, tag = rest.partition(".")
    known = _names(False)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {rest!r}.{hint} The names are timm.list_models()")
    if tag and rest not in _names(True):
        tags = [n for n in _names(True) if n.split(".", 1)[0] == arch]
        close = difflib.get_close_matches(rest, tags, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ValueError(f"timm model {arch!r} has no pretrained tag {tag!r}.{hint} Its tags: "
                         f"{', '.join(t.split('.', 1)[1] for t in tags) or 'none'}")
    cfg = _pretrained_cfg(rest)
    size = tuple(int(s) for s in cfg.get("input_size") or (3, 224, 224))
    weights = cfg.get("hf_hub_id") or cfg.get("url")
    return ModelSpec(
        name=f"timm/{rest}",
        factory=_factory(rest, cfg),
        family="timm",
        example_input=size,
        description=f"timm {rest} (random init" + ("; pretrained: true loads " + str(weights) if weights else "") + ")",
    )


def _factory(rest: str, cfg: dict[str, Any]) -> Callable[..., nn.Module]:
    def build(num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
        timm = _timm()
        if len(input_shape) != 3:
            raise ValueError(f"timm models take images (C, H, W), but this data set gives inputs of shape "
                             f"{tuple(input_shape)}")
        for key in SET_BY_KDRAY:
            if key in options:
                raise TypeError(f"option {key!r} of timm/{rest} is set from the data set; remove it")
        pretrained = options.pop("pretrained", False)
        if not isinstance(pretrained, bool):
            raise TypeError(f"option 'pretrained' of timm/{rest} must be true or false, got {pretrained!r}")
        c, h, w = (int(s) for s in input_shape)
        default = tuple(cfg.get("input_size") or (3, 224, 224))
        if cfg.get("fixed_input_size") and "img_size" not in options and (h, w) != tuple(default[1:]):
            options["img_size"] = (h, w)
        if pretrained and not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
            tagged = [n for n in _names(True) if n.split(".", 1)[0] == rest.split(".", 1)[0]]
            raise ValueError(f"timm has no pretrained weights for {rest}"
                             + (f"; tags with weights: {', '.join(tagged[:8])}" if tagged else "")
                             + "; or set `pretrained: false`")
        try:
            net = timm.create_model(rest, pretrained=pretrained, num_classes=num_classes, in_chans=c, **options)
        except Exception as e:  # noqa: BLE001 - only download failures are rephrased, the rest re-raised
            if pretrained and _download_failure(e):
                raise ValueError(_download_message(rest, cfg, e)) from None
            raise
        if pretrained:
            net.kd_record_options = {"pretrained": False}  # the record holds the weights: rebuild, no download
        # probed at timm's own size unless built for another: a 1x1 map at small sizes would look pooled
        size = (c, h, w) if "img_size" in options else (c, *default[1:])
        return set_layout(net, *layout(net, rest, size, {**options, "num_classes": num_classes, "in_chans": c}))

    build.__name__ = f"timm_{re.sub(r'[^0-9a-zA-Z_]', '_', rest)}"
    return build


# -- pretrained weights ----------------------------------------------------------------------------------
NETWORK_MODULES = ("huggingface_hub", "requests", "urllib", "urllib3", "http", "httpx", "httpcore", "socket", "ssl")


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return seen


def _download_failure(e: BaseException) -> bool:
    """An error of fetching weights (offline, not cached, hub or URL unreachable), not of the model."""
    return any(isinstance(x, OSError) or type(x).__module__.split(".")[0] in NETWORK_MODULES for x in _chain(e))


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir(cfg: dict[str, Any]) -> str:
    if cfg.get("hf_hub_id"):
        try:
            from huggingface_hub import constants

            return str(constants.HF_HUB_CACHE)
        except ImportError:
            pass
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _download_message(rest: str, cfg: dict[str, Any], e: BaseException) -> str:
    source = f"{cfg['hf_hub_id']} on the Hugging Face Hub" if cfg.get("hf_hub_id") else str(cfg.get("url"))
    cause = _chain(e)[-1]
    reason = (str(cause).strip().splitlines() or [""])[0][:200]
    offline = " Offline mode is on (HF_HUB_OFFLINE=1)." if _offline() else ""
    return (f"cannot load the pretrained weights of timm/{rest}: fetching {source} failed "
            f"({type(cause).__name__}: {reason}).{offline} Pretrained weights need network access, or the files "
            f"already in the local cache ({_cache_dir(cfg)}); set `pretrained: false` to start from random weights")


# -- the KD layout ---------------------------------------------------------------------------------------
CONTAINERS = ("stages", "layers", "blocks", "features")


def _feature_dicts(net: nn.Module) -> list[dict[str, Any]]:
    info = getattr(net, "feature_info", None) or []
    return list(info.get_dicts()) if hasattr(info, "get_dicts") else [dict(d) for d in info]


def _real_name(name: str, modules: list[str]) -> str | None:
    """``name`` if ``net`` has it, else the module it means (``block.0`` -> ``blocks.0``), else None."""
    if name in modules:
        return name
    nested = [m for m in modules if m.endswith("." + name)]
    if len(nested) == 1:
        return nested[0]
    index = _index(name)
    same = [m for m in modules if m.count(".") == name.count(".") and _index(m) == index]
    close = difflib.get_close_matches(name, same, n=1, cutoff=0.8)
    return close[0] if close else None


def _index(name: str) -> str:
    return name[len(name.rstrip("0123456789")):]


def _called(name: str, modules: dict[str, nn.Module], ran: set[str] | None) -> str | None:
    """``name``, or for a container that is never called (a ModuleList of blocks) its last child that is."""
    if ran is None or name in ran:
        return name
    children = [f"{name}.{c}" for c, _ in modules[name].named_children()]
    return next((c for c in reversed(children) if c in ran), None)


def _spaced(names: list[str], k: int = 4) -> list[str]:
    n = len(names)
    return names if n <= k else [names[round(n * (i + 1) / k) - 1] for i in range(k)]


def feature_layers(net: nn.Module, ran: set[str] | None = None) -> list[str]:
    """The default hint layers: stage outputs from timm's ``feature_info`` (see the module docstring).

    ``ran``: the modules a forward pass calls, when known; others produce nothing to tap."""
    modules = dict(net.named_modules())
    names = [n for n in modules if n]
    entries: list[tuple[str, int]] = []
    for d in _feature_dicts(net):
        real = _real_name(str(d.get("module", "")), names)
        real = _called(real, modules, ran) if real is not None else None
        if real is not None and real not in [r for r, _ in entries]:
            entries.append((real, int(d.get("reduction") or 0)))
    if not entries:
        children = dict(net.named_children())
        for c in CONTAINERS:
            if isinstance(children.get(c), (nn.Sequential, nn.ModuleList)) and len(children[c]) > 1:
                called = [f"{c}.{i}" for i in range(len(children[c]))]
                called = [n for n in called if ran is None or n in ran]
                if len(called) > 1:
                    return _spaced(called)
        return []
    reductions = [r for _, r in entries]
    if len(set(reductions)) == 1:
        return _spaced([n for n, _ in entries])
    last = {r: n for n, r in entries}
    deep = [n for n, r in entries if last[r] == n and r >= 4]
    return deep if len(deep) >= 2 else [n for n, r in entries if last[r] == n]


def _classifier(net: nn.Module) -> nn.Module | None:
    get = getattr(net, "get_classifier", None)
    clf = get() if callable(get) else None
    if isinstance(clf, (tuple, list)):
        clf = clf[0] if clf else None
    return clf if isinstance(clf, nn.Module) and not isinstance(clf, nn.Identity) else None


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


@dataclass
class Probe:
    """What a shape-only forward pass saw: the modules it called and the module giving the classifier input."""

    ran: set[str]
    embedding: str | None


def probe(rest: str, input_shape: tuple[int, ...], kwargs: dict[str, Any]) -> Probe:
    """Run a replica on the meta device (shapes only, no compute, no weights) with every module hooked."""
    timm = _timm()
    with torch.device("meta"):
        replica = timm.create_model(rest, pretrained=False, **kwargs).eval()
    clf = _classifier(replica)
    names = {m: n for n, m in replica.named_modules() if n}
    inside = set(clf.modules()) - {clf} if clf is not None else set()
    order: list[tuple[str, tuple[int, ...], bool]] = []
    target: list[tuple[int, ...]] = []
    mark = ("", (), True)

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        t = _first_tensor(output)
        if t is not None:
            order.append((names[module], tuple(t.shape), module in inside))

    def enter(_module: nn.Module, inputs: Any) -> None:
        t = _first_tensor(inputs)
        if t is not None and not target:
            target.append(tuple(t.shape))
            order.append(mark)

    handles = [m.register_forward_hook(record) for m in names]
    if clf is not None:
        handles.append(clf.register_forward_pre_hook(enter))
    try:
        with torch.no_grad():
            replica(torch.empty(2, *input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    ran = {n for n, _, _ in order if n}
    if not target:
        return Probe(ran, None)
    cut = order.index(mark)
    return Probe(ran, _pick(order[:cut], order[cut + 1:], target[0], dict(replica.named_modules())))


PASS_THROUGH = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)


def _pick(before: list[tuple[str, tuple[int, ...], bool]], after: list[tuple[str, tuple[int, ...], bool]],
          target: tuple[int, ...], modules: dict[str, nn.Module]) -> str | None:
    """Walking back from the classifier over modules whose output is its input (up to 1x1 spatial dims), the
    first that computes something (not a dropout, identity or flatten); else the earliest of those."""

    def same(shape: tuple[int, ...]) -> bool:
        return shape[:len(target)] == target and all(s == 1 for s in shape[len(target):])

    run: list[str] = []
    for name, shape, _ in reversed(before):
        if not same(shape):
            break
        if not isinstance(modules[name], PASS_THROUGH):
            return name
        run.append(name)
    if run:
        return run[-1]
    return next((n for n, s, inside in after if inside and same(s) and not isinstance(modules[n], PASS_THROUGH)),
                None)


def layout(net: nn.Module, rest: str, input_shape: tuple[int, ...], kwargs: dict[str, Any]) -> tuple[list[str], str]:
    """``(hint layers, embedding layer)`` of a built timm model (see the module docstring)."""
    from timm.layers import SelectAdaptivePool2d

    try:
        seen: Probe | None = probe(rest, input_shape, kwargs)
    except Exception:  # noqa: BLE001 - a model the meta device cannot run keeps the static layout
        seen = None
    modules = dict(net.named_modules())
    features = feature_layers(net, seen.ran if seen else None)
    if seen and seen.embedding in modules:
        return features, seen.embedding  # type: ignore[return-value]
    pools = [n for n, m in modules.items() if n and isinstance(m, SelectAdaptivePool2d)]
    return features, pools[-1] if pools else (features[-1] if features else "")


MODELS.add_source("timm", resolve, "any timm image model, e.g. timm/resnet18, timm/convnext_atto "
                  "(options: pretrained: true loads its weights from the Hugging Face Hub)")
