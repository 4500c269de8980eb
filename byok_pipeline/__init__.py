"""Connected side of BYOK: validate, import, verify and record `.byok` packages.

The core (validation, state machine, records) is pure; Azure SDK adapters live in
``keyvault.py`` and ``blobstore.py``. Nothing is configured at import time.
"""

__version__ = "0.1.0"
