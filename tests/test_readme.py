"""The README names what the code exposes."""

from __future__ import annotations

import re
from pathlib import Path

from probe.daemon.metrics import Metrics

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_metric_the_daemon_exposes_is_in_the_readme_by_its_exposed_name() -> None:
    exposed = {f"{f.name}_total" if f.type == "counter" else f.name for f in Metrics().registry.collect()}
    text = README.read_text()
    ooni = text.index("## OONI")  # OONI's keys (probe_cc, probe_asn...) are not metrics
    text = text[:ooni] + text[text.index("\n## ", ooni + 1) :]
    named = set(re.findall(r"`((?:probe|tunnelwatch)_[a-z_]+)[`{]", text))
    assert named - exposed == set(), "named in README.md but not exposed"
    assert exposed - named == set(), "exposed but not named in README.md"
