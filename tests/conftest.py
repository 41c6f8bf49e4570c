"""Fixtures shared by every test module."""

import gin
import pytest


@pytest.fixture(autouse=True)
def clean_gin():
    """Each test starts and ends with no gin bindings: t5lite's entry points parse gin globally."""
    gin.clear_config()
    yield
    gin.clear_config()
