"""rrto_lab: the kernel side of rrto.

``rrto_lab.connect()`` opens a session with an rrto GPU server; while it is active, ordinary
PyTorch code that uses ``cuda`` runs on that server. See README.md and docs/architecture.md.
"""

from rrto_lab.errors import RemoteError, RrtoError, ServerUnavailable, SessionClosed
from rrto_lab.session import MODES, Session, connect

__version__ = "0.1.0"
__all__ = ["MODES", "RemoteError", "RrtoError", "ServerUnavailable", "Session", "SessionClosed",
           "connect"]
