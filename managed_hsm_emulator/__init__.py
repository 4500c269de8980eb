"""A local stand-in for Azure Key Vault Managed HSM's keys API, with real BYOK import.

Start it with ``python -m managed_hsm_emulator --data-dir DIR``; talk to it with the real
``azure-keyvault-keys`` SDK and :class:`EmulatorCredential`. For tests, see
:mod:`managed_hsm_emulator.testing`. A development tool, not an HSM: see README.md.
"""

from .credential import EmulatorCredential

__version__ = "0.1.0"
__all__ = ["EmulatorCredential", "__version__"]
