"""``python -m higgs_tune.manifest``: the stage's CLI (:func:`higgs_tune.manifest.run.main`)."""

from .run import main

raise SystemExit(main())
