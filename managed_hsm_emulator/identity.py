"""The emulator's stable identity: its port (kept in ``DIR/identity.json``) and the names it answers to.

Every ``kid`` the emulator issues is ``https://<authority>/keys/<name>/<version>``, and a BYOK
package names its KEK by such a kid. So the authority must not change between starts on the same
data directory, and must not be whatever a client puts in ``Host``:

- **Port.** The first start binds the requested port (``--port 0``: any free one) and writes it
  to ``DIR/identity.json``. A later start with ``--port 0`` binds that same port again, and fails
  (reason ``port_in_use``) rather than silently moving if something else holds it. An explicit
  ``--port N`` always wins and becomes the persisted port (the emulator then has a new identity:
  kids change and packages built for its old KEK kids are refused).
- **Authorities.** The emulator answers only to ``127.0.0.1:PORT``, ``localhost:PORT`` and
  ``[::1]:PORT`` (the names its certificate carries), plus the bound host when it is a specific
  address or name other than those; a bare name is also accepted when PORT is 443. Any other
  ``Host`` gets ``400 BadParameter`` (reason ``bad_host``), and a package's kid must name one of
  these authorities (reason ``kid_wrong_hsm`` otherwise). A KEK downloaded through ``localhost``
  therefore imports through ``127.0.0.1`` as well: the names are aliases of one HSM.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from .datadir import DataDir, atomic_write
from .errors import StartupError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104  # names of the wildcard, not a bind


def host_for_authority(host: str) -> str:
    """A bind host as it appears in a URL authority: lower case, IPv6 literals in brackets."""
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{addr.compressed}]" if addr.version == 6 else addr.compressed


@dataclass(frozen=True)
class Identity:
    """The authorities (``host:port``) an emulator bound to ``bound_host``:``port`` answers to."""

    bound_host: str
    port: int

    @property
    def authorities(self) -> frozenset[str]:
        names = list(LOOPBACK_NAMES)
        if self.bound_host not in WILDCARD_HOSTS:
            names.append(host_for_authority(self.bound_host))
        out = {f"{name}:{self.port}" for name in names}
        if self.port == 443:  # HTTPS's default port may be left out of Host and of URLs
            out.update(names)
        return frozenset(out)

    def describe(self) -> str:
        """E.g. ``127.0.0.1:8443, [::1]:8443, localhost:8443`` (for error messages)."""
        return ", ".join(sorted(self.authorities))


def load_port(paths: DataDir) -> int | None:
    """The port persisted by an earlier start, or None on a first start.

    Raises:
        StartupError: reason ``damaged_state`` if ``identity.json`` cannot be read.
    """
    path = paths.identity
    if not path.exists():
        return None
    try:
        port = json.loads(path.read_text(encoding="utf-8"))["port"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StartupError(
            f"{path.name} cannot be read ({type(exc).__name__}); fix or remove it (removing it "
            "gives the emulator a new port, so packages built for its KEKs will be refused)",
            reason="damaged_state",
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise StartupError(f"{path.name} holds no valid port", reason="damaged_state")
    return port


def save_port(paths: DataDir, port: int) -> None:
    """Persist the port the emulator is now bound to (atomically)."""
    doc = {
        "port": port,
        "note": "the port this emulator's kids carry; --port 0 reuses it, --port N replaces it",
    }
    atomic_write(paths.identity, json.dumps(doc, indent=1).encode(), mode=0o644)
