"""rrto_server: the GPU server of rrto. It runs forwarded ATen ops on its device.

It knows nothing of notebooks; the only thing it shares with the client is the wire protocol
(:mod:`rrto_server.protocol`).
"""

__version__ = "0.1.0"
