"""Every registered knowledge type is visible (`kdray list` cites its paper), checked (a dry run on real CNN
pairs) and offered (the shipped CIFAR spaces search it around its reference weight)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from kdray.check import dry_run
from kdray.config import ConfigError, RunConfig
from kdray.knowledge import KNOWLEDGE, Knowledge
from kdray.knowledge.base import short_citation

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
# kdray's own types (plugins that other tests import register theirs in the same registry)
TYPES = sorted(n for n, _ in KNOWLEDGE.items() if KNOWLEDGE.origin(n) == "kdray")
# Types whose default layers are a transformer's attention taps: a CNN pair has none, and they say so.
NEEDS_ATTENTION = {"attn", "minilm"}
# Token-level types (language models) also run on a classifier's logits (one token per sample), so the CNN pairs
# dry-run them; the space that offers them is the language-model one.
TOKEN_TYPES = [n for n in TYPES if KNOWLEDGE.get(n).family == "token"]
# Types for language models only: ``uld`` aligns two causal LMs' answer tokens, and a classifier pair is refused.
LM_ONLY = {"uld"}
CNN_TYPES = [n for n in TYPES if n not in NEEDS_ATTENTION and n not in TOKEN_TYPES and n not in LM_ONLY]
PAIRS = [("resnet32x4", "resnet8x4"), ("resnet18", "mobilenet_v2")]
# (teacher, student, type) -> words the refusal must contain: the pair's shapes cannot be combined.
REFUSES = {
    ("resnet18", "mobilenet_v2", "fsp"): ("channel", "FSP matrix"),  # 64x128 vs 24x32 Gram matrices
}


def config(teacher: str, student: str, knowledge: str) -> RunConfig:
    return RunConfig.model_validate({"dataset": {"name": "test_images"},
                                     "teacher": {"train": {"model": {"name": teacher}}},
                                     "student": {"name": student}, "knowledge": [{"type": knowledge}]})


# -- visible: the paper of each type ------------------------------------------------------------------------
@pytest.mark.parametrize("name", TYPES)
def test_every_registered_type_cites_its_paper(name):
    paper = KNOWLEDGE.get(name).paper()
    assert re.fullmatch(r"[^\W\d][\w' .-]* (19|20)\d\d", paper), (name, paper)


def test_the_citations_name_first_author_and_year():
    expected = {"kd": "Hinton et al. 2015", "dkd": "Zhao et al. 2022", "fitnet": "Romero et al. 2015",
                "at": "Zagoruyko et al. 2017", "nst": "Huang et al. 2017", "fsp": "Yim et al. 2017",
                "rkd": "Park et al. 2019", "pkt": "Passalis et al. 2018", "minilm": "Wang et al. 2020"}
    assert {n: KNOWLEDGE.get(n).paper() for n in expected} == expected


@pytest.mark.parametrize("doc,short", [
    (None, ""),
    ("A loss.", ""),
    ("A loss.\n\n    With :math:`p` the probabilities of 2020 samples.", ""),
    ("A loss.\n\n    Just some prose, 2019 and more.", ""),
    ('A loss.\n\n    Smith, "A 1999 Title", ICML 2020, pp. 1-10.', "Smith 2020"),  # one author; not the title's year
    ('A loss.\n\n    G. E. Hinton, O. Vinyals and J. Dean. \u201cDistilling\u201d. NIPS 2015.', "Hinton et al. 2015"),
    ('A loss.\n\n    Laurens van der Maaten & Hinton, "t-SNE", JMLR 2008.', "van der Maaten et al. 2008"),
    ('A loss.\n\n    Wang et al., "MiniLM", arXiv:2002.10957.', "Wang et al. 2020"),  # the year from the arXiv id
    ("A loss.\n\n    Smith & Jones (2021). A title.", "Smith et al. 2021"),
])
def test_short_citation_reads_the_reference_after_the_first_line(doc, short):
    assert short_citation(doc) == short


def test_a_type_without_a_citing_docstring_has_no_paper():
    class Bare(Knowledge):
        """A loss without a reference."""

    class Inherits(KNOWLEDGE.get("kd")):  # only a class's own docstring counts
        pass

    assert Bare.paper() == "" and Inherits.paper() == ""


def test_list_shows_the_paper_of_every_type(capsys):
    from kdray.cli import main

    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["knowledge"]
    assert all(data[n]["paper"] == KNOWLEDGE.get(n).paper() for n in TYPES)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  kd +response +Hinton et al\. 2015 ", out, re.M), out


# -- checked: a dry run of every type on real CNN pairs -------------------------------------------------------
def test_the_attention_only_types_are_registered():
    assert NEEDS_ATTENTION <= set(TYPES)
    assert TOKEN_TYPES == ["tkd"]
    assert {"kd", "dkd", "dist", "ctkd", "fitnet", "at", "nst", "fsp", "ab", "vid", "rkd", "sp", "pkt",
            "cc"} <= set(CNN_TYPES)


@pytest.mark.parametrize("teacher,student", PAIRS)
@pytest.mark.parametrize("name", TYPES)
def test_every_type_dry_runs_on_cnn_pairs(teacher, student, name):
    cfg = config(teacher, student, name)
    refusal = REFUSES.get((teacher, student, name))
    if name in LM_ONLY:
        with pytest.raises(ConfigError) as e:
            dry_run(cfg)
        assert e.value.fields == ["knowledge.0.type"] and "language models" in str(e.value), str(e.value)
        return
    if name in NEEDS_ATTENTION or refusal:
        with pytest.raises(ConfigError) as e:
            dry_run(cfg)
        assert e.value.fields == ["knowledge.0"], str(e.value)
        words = ("attention",) if name in NEEDS_ATTENTION else refusal
        assert all(w in str(e.value) for w in words), str(e.value)
        return
    try:
        report = dry_run(cfg)
    except ConfigError as e:  # a new type (or a changed one) that cannot take a CNN pair: say which list to extend
        kind = "NEEDS_ATTENTION" if "attention" in str(e) else "REFUSES (asserting the shape message)"
        pytest.fail(f"{name} on {teacher} -> {student}: {e}; if this is by design, add it to {kind}")
    assert report.knowledge == name and report.teacher == teacher and report.student == student


# -- offered: the CIFAR spaces search every CNN type around its reference weight --------------------------
# Each weight's log range is centred (geometric mean of low and high) on the reference default: RepDistiller's
# scripts/run_cifar_distill.sh and train_student.py (-r CE, -a KD, -b the method), mdistiller's DKD config for
# the pair, the DIST authors' CIFAR recipe, CTKD's script, OFD's (and mdistiller's) 1/1000 folded into the loss,
# ReviewKD's script/reviewKD.sh for the pair; CC from AberHu/Knowledge-Distillation-Zoo, whose formula kdray
# follows (RepDistiller's CC is another formula).
REFERENCE = {
    "kd": {"kd.weight": 0.9, "ce_weight": 0.1}, "dkd": {"dkd.alpha": 1, "dkd.beta": 8},
    "dist": {"dist.beta": 2, "dist.gamma": 2}, "ctkd": {"ctkd.weight": 0.9, "ce_weight": 0.1},
    "fitnet": {"fitnet.weight": 100}, "at": {"at.weight": 1000}, "nst": {"nst.weight": 50},
    "fsp": {"fsp.weight": 50}, "ab": {"ab.weight": 1}, "vid": {"vid.weight": 1}, "ofd": {"ofd.weight": 1},
    "reviewkd": {"reviewkd.weight": 5}, "sp": {"sp.weight": 3000}, "rkd": {"rkd.weight": 1},
    "pkt": {"pkt.weight": 30000}, "cc": {"cc.weight": 100}, "crd": {"crd.weight": 0.8},
    "mlkd": {"mlkd.weight": 0.9, "ce_weight": 0.1},
    "born_again+kd": {"kd.weight": 0.9, "ce_weight": 0.1},
}
PER_PAIR = {  # resnet56 -> resnet20: mdistiller configs/cifar100/dkd/res56_res20.yaml, ReviewKD --kd-loss-weight 0.6
    "cifar10_resnet56_resnet20.yaml": {"dkd": {"dkd.alpha": 1, "dkd.beta": 2}, "reviewkd": {"reviewkd.weight": 0.6}},
}


@pytest.mark.parametrize("file", ["cifar100_resnet32x4_resnet8x4.yaml", "cifar10_resnet56_resnet20.yaml"])
def test_cifar_spaces_offer_every_cnn_type_around_its_reference_weight(file):
    from kdray.sweep.space import load_space

    space = load_space(SPACES / file)
    missing = set(CNN_TYPES) - set(space.choices)
    assert not missing, f"{file} does not offer {sorted(missing)}"
    assert {"dml", "born_again+kd"} <= set(space.choices)  # the schemes, besides the losses
    for choice in ("dml", "born_again+kd"):  # each resolves to a valid run of its scheme
        assert space.resolve({"knowledge": choice}).scheme.type == choice.split("+")[0]
    assert not NEEDS_ATTENTION & set(space.choices)
    for choice, weights in {**REFERENCE, **PER_PAIR.get(file, {})}.items():
        for key, default in weights.items():
            d = space.choices[choice][key]
            assert d.log and d.high / d.low >= 10, (choice, key)
            assert math.isclose(math.sqrt(d.low * d.high), default, rel_tol=1e-9), (choice, key, d)


def test_the_language_model_space_offers_every_token_type():
    from kdray.sweep.space import load_space

    space = load_space(SPACES / "tiny_lm.yaml")
    assert set(TOKEN_TYPES) <= set(space.choices) and space.metric == "val_nll" and space.mode == "min"
