"""The throwaway PostgreSQL as root with the clone in a 0700 directory (issue 14.6)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from bridge.devtools.pgserver import PostgresNotFound, _reachable, _service_user, reachable_bindir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")


def _fake_install(root, *, self_contained: bool):
    (root / "bin").mkdir(parents=True)
    if self_contained:
        (root / "lib").mkdir()
        (root / "share").mkdir()
        (root / "share" / "postgresql.conf.sample").write_text("# sample\n")
    for exe in ("initdb", "pg_ctl", "postgres"):
        path = root / "bin" / exe
        path.write_text("#!/bin/sh\necho fake-postgres\n")
        path.chmod(0o700)
    return root / "bin"


def test_binaries_in_a_closed_directory_are_copied_where_the_server_user_can_run_them(tmp_path):
    user = _service_user()
    closed = tmp_path / "root-home"
    bindir = _fake_install(closed / "venv" / "pginstall", self_contained=True)
    closed.chmod(0o700)
    assert not _reachable(bindir / "postgres", user)
    got = reachable_bindir(bindir, user)
    try:
        assert got != bindir and _reachable(got / "postgres", user)
        out = subprocess.run(["runuser", "-u", user, "--", str(got / "postgres")], capture_output=True, text=True)
        assert out.stdout.strip() == "fake-postgres"
        assert (got.parent / "share" / "postgresql.conf.sample").exists()
        assert reachable_bindir(bindir, user) == got          # reused, not copied again
    finally:
        shutil.rmtree(got.parent, ignore_errors=True)


def test_an_installation_that_cannot_be_copied_gets_exact_instructions(tmp_path):
    user = _service_user()
    closed = tmp_path / "root-home"
    bindir = _fake_install(closed / "pg", self_contained=False)
    closed.chmod(0o700)
    with pytest.raises(PostgresNotFound) as exc:
        reachable_bindir(bindir, user)
    text = str(exc.value)
    assert "is closed to it" in text   # the first directory on the way that the user cannot enter
    assert "export CRM_BRIDGE_PG_BINDIR=/opt/crm-bridge-pg/bin" in text and f"cp -a {bindir.parent}" in text
