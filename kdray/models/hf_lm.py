"""Causal language models: ``hf-lm/<hub id or local folder>`` and small ones built from a config.

``hf-lm/<source>`` builds ``AutoModelForCausalLM`` (Llama, Qwen2/3, GPT-2, Gemma, ... families) from a folder written
by ``save_pretrained`` or a hub id (which needs the network or the local cache). ``tiny_llama``, ``tiny_qwen3`` and
``tiny_gpt2`` build one of those families from a few sizes (layers, hidden, heads), randomly initialised, for data
sets whose tokenizer kdray makes (``python_docs``, ``synthetic_lm``). Either way the vocabulary is the data set's
(``num_classes``) and a record rebuilds the model from the config it carries, without the folder or the hub.

The wrapper (:class:`HFCausalLM`) takes token ids (B, T) and has two faces: ``forward`` returns the logits (B, T, V),
as the Hugging Face model would (exports, generation, latency); ``states`` returns :class:`TokenStates`, the last
hidden states and the output head (its weight, bias, and the family's logit scaling or soft-capping), from which the
training loss computes logits a chunk of tokens at a time (:mod:`kdray.knowledge.token`). Taps are those of the
classifiers (:mod:`kdray.models.hf`): ``hidden.i`` (B, H, T), ``attention.i`` (B, heads, T, T), ``value.i`` and
``pooled``, here the last position's hidden state (B, H). Training blocks are packed, so no position is padding:
no attention mask is passed and the model's own causal mask applies.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from kdray.knowledge.token import LMHead, TokenStates
from kdray.models.hf import (
    CLEAN_ATTENTION,
    HFClassifier,
    apply_overrides,
    attention_impl,
    build,
    check_reinitialised,
    config_dict,
    config_from_dict,
    copy_layers,
    hooked,
    layer_list,
    load_config,
    looks_local,
    quiet_transformers,
    teacher_layer_choice,
    transformers_module,
)
from kdray.models.hf import init_from_teacher as init_classifier
from kdray.models.zoo import MODELS, ModelSpec, register_model, unwrap

_FAST_ATTENTION = "sdpa"


class SequenceTooLong(ValueError):
    """Blocks longer than the model's positions (``dataset.seq_len``)."""


def _kind_lm(config: Any) -> None:
    from transformers.models.auto import modeling_auto as auto

    if type(config) not in auto.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"the Hugging Face model type {config.model_type!r} has no causal language-model head "
                         "(hf-lm/ takes decoder models: Llama, Qwen, GPT-2, ...; hf/ takes classifiers)")


def resolve(rest: str) -> ModelSpec:
    """``hf-lm/<rest>`` -> a ModelSpec whose factory builds the causal LM."""
    config = load_config(rest)
    try:
        _kind_lm(config)
    except ValueError as e:
        raise ValueError(f"hf-lm/{rest}: {e}") from None

    def factory(num_classes: int, input_shape: tuple[int, ...], **options: Any) -> nn.Module:
        return build_lm(rest, num_classes, input_shape, **options)

    factory.__name__ = "hf_lm_model"
    return ModelSpec(f"hf-lm/{rest}", factory, "causal-lm", (16,),
                     f"Hugging Face {config.model_type} causal LM", example_dtype="int64")


MODELS.add_source("hf-lm", resolve, "Hugging Face causal LMs: hf-lm/<hub id> or hf-lm/./<folder from save_pretrained>; "
                  "options pretrained (default true), config (overrides), allow_reinit")


def vocab_of(config: Any) -> int:
    return int(getattr(config, "vocab_size", 0) or 0)


def max_positions(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return None


def build_lm(source: str | None, num_classes: int, input_shape: tuple[int, ...], *, pretrained: bool = True,
             config: dict[str, Any] | None = None, hf_config: dict[str, Any] | None = None,
             allow_reinit: bool = False) -> "HFCausalLM":
    """Build a causal LM for a vocabulary of ``num_classes`` tokens and blocks of ``input_shape = (T,)`` tokens.

    The model's vocabulary must hold the data's (a tokenizer's ids index its embedding) and its positions the
    block length; a model built from a config without a vocabulary size takes the data's."""
    transformers = transformers_module()
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 1:
        raise ValueError(f"a causal LM takes blocks of token ids (T,), not inputs of shape {input_shape}")
    if hf_config is not None:
        cfg, pretrained = config_from_dict(hf_config), False
    elif source is None:
        raise ValueError("a causal LM needs a source or hf_config")
    else:
        cfg = load_config(source)
    apply_overrides(cfg, dict(config or {}))
    _kind_lm(cfg)
    vocab = vocab_of(cfg)
    if vocab < num_classes:
        raise ValueError(f"the model's vocabulary has {vocab} tokens but the data set's tokenizer has {num_classes}: "
                         "the teacher, the student and the data must share one tokenizer")
    positions = max_positions(cfg)
    if positions is not None and input_shape[0] > positions:
        raise SequenceTooLong(f"blocks of {input_shape[0]} tokens (seq_len) exceed the model's {positions} positions")
    auto = transformers.AutoModelForCausalLM

    def load(impl: str) -> Any:
        with quiet_transformers():
            if pretrained:
                return auto.from_pretrained(os.path.expanduser(source) if looks_local(source) else source,
                                            config=cfg, attn_implementation=impl, output_loading_info=True)
            return auto.from_config(cfg, attn_implementation=impl), None

    try:
        model, info = load(_FAST_ATTENTION)
    except ValueError as e:  # a family without a fused attention kernel (Gemma 2): its eager attention
        if "attention" not in str(e):
            raise
        model, info = load("eager")
    if pretrained:
        check_reinitialised(model, info, source, dict(config or {}), allow_reinit)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    net = HFCausalLM(model, input_shape, num_classes)
    check_head(net)
    return net


_CHECKED: set[str] = set()  # the families whose head and causality were probed in this process


@torch.no_grad()
def check_head(net: "HFCausalLM") -> None:
    """Probe a family once per process: the logits kdray makes from its hidden states and head must be the model's
    own (a family whose head does more than kdray reproduces, a BERT-style decoder's transform, would train silently
    wrong), and a position's logits must not depend on later tokens (a decoder built without ``is_decoder``)."""
    cfg = net.hf.config
    key = f"{cfg.model_type}:{getattr(cfg, 'is_decoder', None)}"
    if key in _CHECKED:
        return
    was = net.training
    net.eval()
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, net.vocab, (2, 8), generator=g)
        s = net.states(x)
        ours = s.head.logits(s.hidden)
        theirs = net.hf(input_ids=x, use_cache=False).logits.float()[..., :net.vocab]
        if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max().clamp_min(1.0))):
            raise ValueError(f"the {cfg.model_type} family computes its logits in a way kdray does not reproduce from "
                             f"its hidden states and output head (largest difference "
                             f"{float((ours - theirs).abs().max()):.3g}): it cannot be distilled token by token here")
        later = x.clone()
        later[:, -1] = (x[:, -1] + 1) % net.vocab
        s2 = net.states(later)
        if not torch.allclose(s2.hidden[:, :-1], s.hidden[:, :-1], atol=1e-4):
            raise ValueError(f"the {cfg.model_type} model is not causal here (a position sees later tokens; a "
                             "BERT-style model needs is_decoder: true): it cannot be trained on next tokens")
    finally:
        net.train(was)
    _CHECKED.add(key)


class HFCausalLM(HFClassifier):
    """A Hugging Face causal LM as a kdray network: ``forward`` -> logits (B, T, V); ``states`` -> TokenStates."""

    kd_causal_lm = True

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], vocab: int | None = None) -> None:
        super().__init__(model, input_shape)
        self._fast = model.config._attn_implementation  # sdpa, or eager for a family that has no other
        self._eager: str | None = None  # the attention function that returns maps, once an attention tap is hooked
        self.kd_record_options = {**self.kd_record_options, "causal_lm": True}  # what rebuild() reads
        rows = int(model.get_output_embeddings().weight.shape[0])
        # the tokenizer's ids: a model's vocabulary may be padded (Qwen2.5-7B has 152 064 rows, its tokenizer 151 665
        # ids); the loss is over the ids a tokenizer can produce, so teachers and students padded apart still match
        self.vocab_used = min(int(vocab or rows), rows)

    @property
    def vocab(self) -> int:
        """The tokens the loss is over: the data's tokenizer's ids (at most the model's output rows)."""
        return self.vocab_used

    def head(self) -> LMHead:
        """The output head as the family computes its logits, over the tokenizer's ids: Cohere's ``logit_scale``
        multiplies, Granite's ``logits_scaling`` divides, Gemma's ``final_logit_softcapping`` caps c·tanh(z/c)
        (:func:`check_head` refuses a family whose logits differ from these)."""
        out = self.hf.get_output_embeddings()
        cfg = self.hf.config
        scale = float(getattr(cfg, "logit_scale", None) or 1.0)
        if getattr(cfg, "logits_scaling", None):
            scale /= float(cfg.logits_scaling)
        cap = getattr(cfg, "final_logit_softcapping", None)
        n = self.vocab_used
        weight, bias = out.weight, getattr(out, "bias", None)
        if n < weight.shape[0]:
            weight, bias = weight[:n], (bias[:n] if bias is not None else None)
        return LMHead(weight, bias, scale, float(cap) if cap else None)

    def _attention(self, want: bool) -> None:
        """Attention maps need an eager attention function (kdray's clean one where the family allows it): switched
        on while an attention tap is hooked, back to the fast kernel otherwise."""
        current = self.hf.config._attn_implementation
        if want and self._eager is None:
            self._eager = attention_impl(transformers_module().AutoModelForCausalLM, self.hf.config)
        target = self._eager if want else self._fast
        if target and current != target:
            self.hf.set_attn_implementation(target)

    def states(self, x: Tensor) -> TokenStates:
        """(B, T) token ids -> the last hidden states (B, T, H) and the head; feeds the hooked taps."""
        want_hidden = hooked(self.hidden) or hooked([self.pooled])
        want_attention = hooked(self.attention)
        self._attention(want_attention)
        if x.dtype not in (torch.int64, torch.int32):
            x = x.long()
        base = getattr(self.hf, self.hf.base_model_prefix)
        kwargs: dict[str, Any] = {"input_ids": x, "use_cache": False}
        if want_hidden:
            kwargs["output_hidden_states"] = True
        if want_attention:
            kwargs["output_attentions"] = True
        token = CLEAN_ATTENTION.set(True) if want_attention else None
        try:
            out = base(**kwargs)
        finally:
            if token is not None:
                CLEAN_ATTENTION.reset(token)
        last = out.last_hidden_state
        if want_hidden:
            for tap, h in zip(self.hidden, out.hidden_states):
                tap(h.transpose(1, 2))
            self.pooled(last[:, -1])
        if want_attention:
            for tap, a in zip(self.attention, out.attentions):
                tap(a)
        return TokenStates(last, self.head())

    def forward(self, x: Tensor) -> Tensor:
        s = self.states(x)
        return s.head.logits(s.hidden)


def rebuild(num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    """A Hugging Face network (classifier or causal LM) from a record's options, which carry its whole config."""
    if not options.get("causal_lm"):
        return build(None, num_classes, input_shape, **options)
    return build_lm(None, num_classes, input_shape, hf_config=options["hf_config"])


# -- small models of three families, built from a few sizes ------------------------------------------------------
def _lm_from_config(model_type: str, num_classes: int, input_shape: tuple[int, ...], fields: dict[str, Any],
                    config: dict[str, Any] | None) -> HFCausalLM:
    cfg = config_from_dict({"model_type": model_type, **fields, **dict(config or {})})
    return build_lm(None, num_classes, input_shape, hf_config=config_dict(cfg))


def _positions(input_shape: tuple[int, ...], max_positions: int | None) -> int:
    return int(max_positions or max(128, 2 ** math.ceil(math.log2(max(1, input_shape[0])))))


@register_model("tiny_llama", family="causal-lm", example_input=(16,), example_dtype="int64",
                description="a small Llama (RMSNorm, rotary positions, SwiGLU, tied embeddings), random init")
def tiny_llama(num_classes: int, input_shape: tuple[int, ...], layers: int = 4, hidden: int = 128, heads: int = 4,
               kv_heads: int | None = None, intermediate: int | None = None, max_positions: int | None = None,
               config: dict[str, Any] | None = None) -> HFCausalLM:
    return _lm_from_config("llama", num_classes, input_shape, {
        "vocab_size": num_classes, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads, "intermediate_size": intermediate or 4 * hidden,
        "max_position_embeddings": _positions(input_shape, max_positions), "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5}, config)


@register_model("tiny_qwen3", family="causal-lm", example_input=(16,), example_dtype="int64",
                description="a small Qwen3 (q/k norms, rotary positions, SwiGLU, tied embeddings), random init")
def tiny_qwen3(num_classes: int, input_shape: tuple[int, ...], layers: int = 4, hidden: int = 128, heads: int = 4,
               kv_heads: int | None = None, intermediate: int | None = None, max_positions: int | None = None,
               config: dict[str, Any] | None = None) -> HFCausalLM:
    return _lm_from_config("qwen3", num_classes, input_shape, {
        "vocab_size": num_classes, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads, "head_dim": hidden // heads,
        "intermediate_size": intermediate or 4 * hidden,
        "max_position_embeddings": _positions(input_shape, max_positions), "tie_word_embeddings": True}, config)


@register_model("tiny_gpt2", family="causal-lm", example_input=(16,), example_dtype="int64",
                description="a small GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings), random init")
def tiny_gpt2(num_classes: int, input_shape: tuple[int, ...], layers: int = 4, hidden: int = 128, heads: int = 4,
              max_positions: int | None = None, config: dict[str, Any] | None = None) -> HFCausalLM:
    return _lm_from_config("gpt2", num_classes, input_shape, {
        "vocab_size": num_classes, "n_embd": hidden, "n_layer": layers, "n_head": heads,
        "n_positions": _positions(input_shape, max_positions), "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 0}, config)


# -- initialisation from the teacher -----------------------------------------------------------------------------
def init_from_teacher(teacher: nn.Module, mode: str | list[int] = "every_other_layer") -> nn.Module:
    """``student.init_from_teacher``: a student made of some of a Hugging Face teacher's layers, every other weight
    copied; a classifier's (:func:`kdray.models.hf.init_from_teacher`) or a causal LM's."""
    net = unwrap(teacher)
    net = getattr(net, "net", net)
    if not isinstance(net, HFCausalLM):
        return init_classifier(teacher, mode)
    found = layer_list(net.hf)
    if found is None:
        raise ValueError(f"cannot find the layer list of this {net.hf.config.model_type} teacher")
    return init_lm_from_teacher(net, teacher_layer_choice(mode, len(found[1])))


def init_lm_from_teacher(net: HFCausalLM, layers: list[int]) -> HFCausalLM:
    """A student with the teacher's config but only the teacher layers ``layers`` (student layer j is teacher layer
    ``layers[j]``), every other weight (embeddings, final norm, head) copied: Minitron's / DistilBERT's depth
    pruning (:func:`kdray.models.hf.init_from_teacher` checks the indices)."""
    t_model = net.hf
    prefix, _ = layer_list(t_model)
    d = config_dict(t_model.config)
    for key in ("num_hidden_layers", "n_layer"):
        if key in d:
            d[key] = len(layers)
    if "layer_types" in d and isinstance(d["layer_types"], list):
        d["layer_types"] = [d["layer_types"][i] for i in layers]
    student = build_lm(None, net.vocab, (1,), hf_config=d)
    copy_layers(student.hf, t_model, prefix, layers)
    student.kd_model_name = getattr(net, "kd_model_name", "hf-lm")  # type: ignore[assignment]
    return student


__all__ = ["HFCausalLM", "SequenceTooLong", "build_lm", "init_from_teacher", "init_lm_from_teacher", "max_positions",
           "rebuild", "vocab_of"]
