"""Hugging Face transformers: ``hf/<hub id or local path>`` (filled in by issue 11)."""
from __future__ import annotations
