"""server/allocator.py: the glibc tuning that keeps the forward's buffers between batches. Its effect
(no page-fault storm under load) is asserted on a real server in test_server.py."""

from __future__ import annotations

import platform

import pytest

from ddnn_server.allocator import keep_freed_memory


def test_tuning_applies_on_glibc() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt tuning is glibc-only")
    assert keep_freed_memory()
