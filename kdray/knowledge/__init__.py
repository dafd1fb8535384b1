"""Knowledge types (distillation losses), one family per module, registered by name in ``KNOWLEDGE``.

Importing this package registers every family; ``kdray/__init__`` imports it so that Ray workers,
which import kdray fresh, see the same registry as the driver.
"""
from kdray.knowledge import crd, feature, mlkd, ofd, relational, response, reviewkd, token, transformers, uld  # noqa: F401,E501  (registers every type)
from kdray.knowledge.base import KNOWLEDGE, Knowledge, KnowledgeParams, ModelLayout, TapOutputs, register_knowledge
from kdray.knowledge.objective import DistillObjective, nonfinite_terms

__all__ = [
    "KNOWLEDGE",
    "DistillObjective",
    "Knowledge",
    "KnowledgeParams",
    "ModelLayout",
    "TapOutputs",
    "nonfinite_terms",
    "register_knowledge",
]
