"""``python -m distexec``: the same program as the ``distexec`` console script."""

import sys

from .cli import main

sys.exit(main())
