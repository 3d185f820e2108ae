"""The schemathesis run (run_schemathesis.sh) as part of the suite: zero server errors, zero schema violations.

It starts its own database and server from LEDGER_BIN and LEDGER_TEST_PG. Set LEDGER_OPENAPI_SCHEMATHESIS=0 to skip it
(for example when iterating on test_openapi.py); ST_MAX_EXAMPLES and ST_SEED are passed through.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "run_schemathesis.sh"


@pytest.mark.skipif(os.environ.get("LEDGER_OPENAPI_SCHEMATHESIS") == "0", reason="LEDGER_OPENAPI_SCHEMATHESIS=0")
def test_schemathesis_finds_no_failure():
    if not os.environ.get("LEDGER_TEST_PG") or not os.environ.get("LEDGER_BIN"):
        pytest.exit("LEDGER_TEST_PG and LEDGER_BIN must be set", 2)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-20000:]
    assert "Responses with a 5xx status in the server log: 0" in output, output[-5000:]
