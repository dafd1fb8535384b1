"""Tokenizers and teachers for the cross-tokenizer tests (``uld``)."""
from __future__ import annotations

import copy

import torch

from kdray.data.lm_tasks import VOCAB

TINY = {"layers": 1, "hidden": 32, "heads": 2}


def renumbered_teacher(tmp_path, info):
    """A trained-looking teacher (random weights) and the same network saved with its vocabulary renumbered (token
    ``VOCAB[i]`` at id π(i), its embedding and head rows moved with it) and its own tokenizer: another tokenizer for
    kdray, the same distributions over the same strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kdray.models import Preprocess, build_model

    torch.manual_seed(5)
    original = build_model("tiny_llama", len(VOCAB), Preprocess(info.input_shape, passthrough=True),
                           {**TINY, "layers": 2}).eval()
    perm = torch.randperm(len(VOCAB))  # new id of old token i
    moved = copy.deepcopy(original.net.hf)
    with torch.no_grad():
        for emb in {id(e.weight): e for e in (moved.get_input_embeddings(), moved.get_output_embeddings())}.values():
            w = emb.weight.clone()
            emb.weight[perm] = w
    folder = tmp_path / "renumbered"
    moved.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({VOCAB[i]: int(perm[i]) for i in range(len(VOCAB))}, unk_token="_"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="_", pad_token="_", eos_token=".").save_pretrained(folder)
    return original, folder
