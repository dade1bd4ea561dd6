"""rayrcm from Python, for a notebook::

    from rayrcm import api

    rows = api.certify(model, images, labels, sigma=0.25, n=10_000)   # a DataFrame, one row per image
    model, meta = api.load_model("models:/rcm-digits@sigma-0_25")       # any model reference
    table = api.read_results("rayrcm_results/certify/JOB")              # any result folder or file

(:mod:`rayrcm.orchestration.notebook`; ``rayrcm.certify`` is the certification package, whose pure
pieces, ``Smoother`` and ``certify`` on one image, :doc:`docs/python.md` shows too.)
"""

from rayrcm.orchestration.notebook import COLUMNS, certify, load_model, read_results

__all__ = ["COLUMNS", "certify", "load_model", "read_results"]
