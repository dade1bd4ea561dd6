"""rayrcm: robust representation learning and certified robustness on Ray, tracked in MLflow.

The package is layered. ``data``, ``models``, ``objectives``, ``train`` and ``eval`` are pure
PyTorch and never import Ray or MLflow; ``orchestration`` composes them on Ray Train and is the
only place that talks to MLflow; ``cli`` and ``experiments/`` are thin.
"""

__version__ = "0.1.0"
