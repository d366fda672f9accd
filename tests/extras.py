"""What a test needs beyond the default install (a server, a Debian package, a compiler)."""

import os

import pytest

# CI sets LCP_TEST_REQUIRE_EXTRAS=1: there every such test must run, so a missing piece fails it
REQUIRED = os.environ.get("LCP_TEST_REQUIRE_EXTRAS") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip (or, with $LCP_TEST_REQUIRE_EXTRAS=1, fail) when `condition` does not hold."""
    if condition:
        return
    if REQUIRED:
        pytest.fail(f"required here ($LCP_TEST_REQUIRE_EXTRAS=1): {reason}")
    pytest.skip(reason)
