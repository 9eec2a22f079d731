"""Running dtk from tests: in-process through click's CliRunner, or the installed script."""

from __future__ import annotations

import os
import pathlib
import sys
import sysconfig

from click.testing import CliRunner, Result

from toolkit.cli import cli


def dtk(*args: object) -> Result:
    """``dtk ARGS...`` in this process; arguments are converted with str()."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def dtk_executable() -> str:
    """The ``dtk`` console script pip installed for this interpreter."""
    name = "dtk.exe" if os.name == "nt" else "dtk"
    path = pathlib.Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        path = pathlib.Path(sys.executable).parent / name
    assert path.exists(), f"no dtk console script next to {sys.executable}"
    return str(path)
