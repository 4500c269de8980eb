"""``python -m offline_packager``."""

import sys

from .cli import main

sys.exit(main())
