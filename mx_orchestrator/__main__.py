"""``python -m mx_orchestrator`` is ``mxo``."""

import sys

from .cli import main

sys.exit(main())
