"""``python -m squeeze``: the ``squeeze`` command (:mod:`squeeze.apps.cli`).

An entry point, like the console script: no module of the library imports it.
"""

import sys

from squeeze.apps.cli import main

sys.exit(main())
