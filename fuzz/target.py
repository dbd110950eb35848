"""Common entry point of the atheris targets: instrument tlsproxy, then fuzz.

A target module calls ``main(one_input_factory)``; the factory is called after
``atheris.instrument_imports()`` has wrapped the tlsproxy imports, so that
coverage feedback reaches the engines' code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # "fuzz" and "tlsproxy" when run as a script


def main(load: Callable[[], Callable[[bytes], None]]) -> None:
    with atheris.instrument_imports(include=["tlsproxy"]):
        one_input = load()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
