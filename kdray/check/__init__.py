"""Pre-flight checks: everything that can be wrong with a run, found before Ray or MLflow start.

``dry_run`` builds the teacher and student, resolves every tapped layer, infers the connectors and runs
one forward pass of the whole objective on a zero batch; ``check_resources`` compares the workers
asked for with the machine or cluster. Each failure is a ``ConfigError`` naming the file and field.
"""
from __future__ import annotations

from kdray.check.dry_run import DryRun, dry_run, spec_name, student_from_teacher
from kdray.check.resources import check_resources, local_capacity

__all__ = ["DryRun", "check_resources", "dry_run", "local_capacity", "spec_name", "student_from_teacher"]
