"""The suite itself: without the upstream packages it compares har_ref with, it stops instead of skipping."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_EXTRA


def test_a_missing_test_extra_stops_the_run():
    """sys.modules[name] = None is how Python reports a package as not installed (to import and find_spec)."""
    hide = "; ".join(f"sys.modules[{module!r}] = None" for module in TEST_EXTRA)
    script = f"import sys; {hide}; import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", script, "-q", "-p", "no:cacheprovider", "--collect-only",
                           "tests/test_suite.py"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    packages = ", ".join(TEST_EXTRA.values())
    assert f"the test extra is not installed ({packages} missing)" in done.stderr, done.stderr
    assert "pip install -e '.[test]'" in done.stderr
