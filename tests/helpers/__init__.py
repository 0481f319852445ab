"""Test helpers: import them as ``from tests.helpers.<module> import ...`` (the one way)."""
