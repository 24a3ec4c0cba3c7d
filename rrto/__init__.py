"""What ``%load_ext rrto`` loads. It only hands on to :mod:`rrto_lab.magics`."""

from typing import Any


def load_ipython_extension(shell: Any) -> None:
    from rrto_lab.magics import load

    load(shell)


def unload_ipython_extension(shell: Any) -> None:
    from rrto_lab.magics import unload

    unload(shell)
