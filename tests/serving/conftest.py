"""Fixtures of the serving suite; the code lives in serving_fixtures (a unique module name,
so test files can import its helpers whichever suite pytest collects first)."""

from serving_fixtures import *  # noqa: F403 - re-exports the fixtures for pytest
