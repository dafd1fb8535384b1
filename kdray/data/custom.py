"""Data you bring: Hugging Face data sets and tables (filled in by issue 11)."""
from __future__ import annotations
