"""Shared test configuration. Fixtures live in tests/support/<area>.py and are imported
by the test modules that use them (``from tests.support.http import session``), not
defined here: a module's imports then say which fixtures, processes and helpers it
depends on, and a fixture is shared by importing it, never by copying it into another
module. A module re-exports fixtures it imports through ``__all__`` (or ``noqa: F401``)
so the linters see them used."""
