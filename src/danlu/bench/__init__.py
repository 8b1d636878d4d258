"""Benchmarks for ``danlu compare``: frozen real tasks (:mod:`danlu.bench.tasks`) trained with several optimizers.

Needs the ``[bench]`` extra (scikit-learn, for its bundled data sets).
"""

from .user_task import UserTask, UserTaskError

__all__ = ["UserTask", "UserTaskError"]
