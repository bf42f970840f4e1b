"""The experiments reuse the test suite's fixtures (the tiny world and zoo)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_suite_conftest", Path(__file__).parents[1] / "tests" / "conftest.py")
_suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_suite)
globals().update({name: value for name, value in vars(_suite).items() if not name.startswith("__")})
