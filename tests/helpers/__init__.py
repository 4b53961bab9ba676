"""Test harness shared by the test modules: processes, servers and clusters the tests start, and fakes.

Imported as `tests.helpers.<module>` (pyproject's `[tool.pytest.ini_options] pythonpath` puts the
repository root on `sys.path`); the fixtures that wrap them are in tests/conftest.py.
"""
