"""uda: dense multi-task learning and multi-task unsupervised domain adaptation."""

__version__ = "0.1.0"

TASKS = ("semseg", "depth", "normals", "edges")
