"""docs/api.md documents every public name of ``distexec``.

The Sphinx build (``.ci/run``, warnings are errors) checks that each documented name exists
and that every page is in the table of contents; this checks the other direction: a name added
to ``distexec.__all__`` must get an entry in the API reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import distexec

API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_public_name_is_in_the_api_reference():
    text = API_PAGE.read_text(encoding="utf-8")
    # ``.. autoclass:: distexec.Name`` or, with a signature written out, ``distexec.Name(...)``
    documented = set(re.findall(r"^\.\. auto\w+:: distexec\.(\w+)(?:\(.*\))?\s*$", text, re.M))
    mentioned = set(re.findall(r"`distexec\.(\w+)`", text))
    missing = sorted(set(distexec.__all__) - documented - mentioned)
    assert not missing, f"public names missing from docs/api.md: {missing}"
