"""Offline BYOK packager for Azure Key Vault Managed HSM.

Standalone by design: it imports only the standard library, ``cryptography`` and, for HSM
mode, ``pkcs11`` (python-pkcs11). It never imports ``azure.*``: it runs on air-gapped machines.
"""

__version__ = "0.1.0"
TOOL_NAME = "byok-package"
