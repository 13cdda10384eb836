"""``python -m hutchtrace demo ...`` (same as the ``hutchtrace`` console script)."""

import sys

from .cli import main

sys.exit(main())
