"""The fault tests' fixture that stops every worker a test started."""

from tests.fault.conftest import harnesses

__all__ = ["harnesses"]
