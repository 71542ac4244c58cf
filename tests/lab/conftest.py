"""The lab, built once per test module that asks for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.kit import built


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root for network namespaces and iptables")
    with built(tmp_path_factory.mktemp("lab")) as config:
        yield config
