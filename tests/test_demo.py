"""The README's demo command must keep working: run it for real."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_prints_every_call_and_cleans_up():
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = re.findall(r"<- GET (\S+)", proc.stdout)
    assert len(calls) == 11
    assert "/sync/followup/create?AccountID=ACC-1001&CaseID=CASE-501&FollowupID=FU-9001" in calls
    assert "11 delivered" in proc.stdout
    assert "exit code 0" in proc.stdout
