"""Client generators take the whole description, as a new user would run them: openapi-python-client (PyPI, 0.29)
generates every operation and every response with no warning. (swift-openapi-generator is held to the same by
scripts/openapi-client --check, a stage of scripts/test.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from ledgertest import REPO, TIMEOUT

OPENAPI_PATH = REPO / "Sources" / "LedgerHTTP" / "Resources" / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "patch")


def test_openapi_python_client_generates_every_operation_and_response_without_a_warning(tmp_path):
    bin_dir = Path(sys.executable).parent
    generator = bin_dir / "openapi-python-client"
    if not generator.exists():
        pytest.fail("openapi-python-client is not installed in the test environment (scripts/test installs it)")
    # Its formatting step runs ruff, installed beside it.
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "client"
    proc = subprocess.run([str(generator), "generate", "--path", str(OPENAPI_PATH), "--output-path", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said
    assert "warning" not in said.lower(), said

    doc = yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))
    operations = [op for item in doc["paths"].values() for method, op in item.items() if method in METHODS]
    modules = [p for p in out.glob("*/api/*/*.py") if p.name != "__init__.py"]
    assert len(modules) == len(operations), sorted(p.name for p in modules)
    parsed = sum(len(re.findall(r"response\.status_code == \d{3}", p.read_text())) for p in modules)
    documented = sum(len([s for s in op["responses"] if s != "default"]) for op in operations)
    assert parsed == documented, f"{documented} responses documented, {parsed} parsed by the generated client"


def test_the_document_is_served_as_text_yaml_to_who_asks_for_it(server):
    as_text = requests.get(server.base + "/openapi.yaml", headers={"Accept": "text/yaml"}, timeout=TIMEOUT)
    assert as_text.status_code == 200
    assert as_text.headers["Content-Type"] == "text/yaml"
    assert as_text.content == OPENAPI_PATH.read_bytes()
    for accept in ("application/yaml, text/yaml", "*/*", "application/json"):
        r = requests.get(server.base + "/openapi.yaml", headers={"Accept": accept}, timeout=TIMEOUT)
        assert r.headers["Content-Type"] == "application/yaml", accept
