"""``python -m higgs_tune.audit``: see :func:`higgs_tune.audit.run.main`."""

import sys

from .run import main

sys.exit(main())
