"""``python -m higgs_tune.train``: see :mod:`higgs_tune.train`."""

from .loop import main

main()
