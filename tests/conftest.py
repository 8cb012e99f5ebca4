"""Shared test configuration. Fixtures live in tests/support/<area>.py and are imported
by the test modules that use them."""
