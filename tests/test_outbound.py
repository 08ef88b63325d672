"""Outbound safety: TLS verification, redirects, and the address policy (refusal before any
connection).  Every target is on loopback; deny lists use loopback addresses."""

from __future__ import annotations

import subprocess
import sys

import pytest
from psycopg.types.json import Jsonb

from bridge.devtools.receiver import Receiver, Rule
from bridge.http import AddressRefused, policy_from

DENY_LOOPBACK = {"CRM_BRIDGE_DENY_CIDRS": "127.0.0.0/8,::1/128"}


def dead_error(db, trigger_id: int) -> str:
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [trigger_id], expect="dead")
    return db.one("SELECT last_error FROM crm_bridge.delivery WHERE trigger_id = %s", [trigger_id])


def new_customer(db, account: str = "acc-1") -> None:
    db.execute("INSERT INTO crm.customer (account_id, name) VALUES (%s, 'x')", [account])


def redirected_call(db, receiver, daemon_factory, inner, env: dict[str, str]) -> int:
    """A daemon with ``env``, a URL (following redirects) that answers 302 to ``inner``, and one
    call to it under way; returns the URL's id."""
    daemon_factory(env=env)
    receiver.answer("/moved", Rule(status=302, headers={"Location": inner.url("/internal")}))
    tid = db.add_url("customer", "create", receiver.url("/moved"), follow_redirects=True)
    new_customer(db)
    return tid


# -- TLS ----------------------------------------------------------------------------------------
@pytest.fixture
def https_receiver(loopback_ca):
    with Receiver(ssl_context=loopback_ca.server_context("127.0.0.1")) as rx:
        yield rx


def test_tls_certificate_from_an_unknown_ca_is_refused_by_default(db, https_receiver, daemon):
    tid = db.add_url("customer", "create", https_receiver.url("/tls"))
    new_customer(db)
    error = dead_error(db, tid)
    assert "certificate verify failed" in error.lower()
    assert https_receiver.attempts == []  # the handshake failed: no request was ever sent


def test_ca_bundle_setting_trusts_an_internal_ca(db, https_receiver, loopback_ca, daemon_factory):
    daemon_factory(env={"CRM_BRIDGE_CA_BUNDLE": str(loopback_ca.ca_path)})
    db.add_url("customer", "create", https_receiver.url("/tls"))
    new_customer(db)
    [call] = https_receiver.wait_for(1)
    assert call.target == "/tls?AccountID=acc-1"


def test_host_name_is_checked_even_for_a_trusted_ca(db, loopback_ca, daemon_factory):
    # A certificate the CA issued for 127.0.0.2, served on 127.0.0.1.
    with Receiver(ssl_context=loopback_ca.server_context("127.0.0.2")) as rx:
        daemon_factory(env={"CRM_BRIDGE_CA_BUNDLE": str(loopback_ca.ca_path)})
        tid = db.add_url("customer", "create", rx.url("/tls"))
        new_customer(db)
        assert "mismatch" in dead_error(db, tid).lower()
        assert rx.attempts == []


def test_missing_ca_bundle_stops_the_daemon_with_a_clear_message(dsn, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "--dsn", dsn, "run"],
                          env={"CRM_BRIDGE_CA_BUNDLE": str(tmp_path / "nope.pem"), "PATH": ""},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "ca_bundle" in proc.stderr and "not found" in proc.stderr


# -- redirects ----------------------------------------------------------------------------------
def test_redirect_is_not_followed_by_default_and_counts_as_a_failure(db, receiver, daemon):
    receiver.answer("/moved", Rule(status=302, headers={"Location": receiver.url("/target?token=s3cr3t-tok")}))
    tid = db.add_url("customer", "create", receiver.url("/moved"))
    new_customer(db)
    error = dead_error(db, tid)
    assert error.startswith("gave up after 3 attempts: HTTP 302 redirect to ")
    assert "not followed" in error and "s3cr3t-tok" not in error and "token=***" in error
    assert receiver.received("/target") == []
    assert len(receiver.attempts) == 3


def test_redirect_is_followed_when_the_url_opts_in(db, receiver, daemon):
    receiver.answer("/moved", Rule(status=307, headers={"Location": "/target"}))
    db.add_url("customer", "create", receiver.url("/moved"), follow_redirects=True)
    new_customer(db)
    [call] = receiver.wait_for(1, "/target")
    assert call.headers["Idempotency-Key"] == db.one("SELECT id::text FROM crm_bridge.delivery")
    db.wait_until("SELECT status FROM crm_bridge.delivery", expect="delivered")


def test_followed_redirect_to_a_denied_address_is_refused_before_connecting(
        db, receiver, listener_factory, daemon_factory):
    inner = listener_factory("127.0.0.2")
    tid = redirected_call(db, receiver, daemon_factory, inner, {"CRM_BRIDGE_DENY_CIDRS": "127.0.0.2/32"})
    error = dead_error(db, tid)
    assert "refused by the address policy" in error and "127.0.0.2/32" in error
    assert inner.accepted == 0
    assert len(receiver.attempts) == 1  # refusals are permanent: no retries


def test_configured_headers_are_not_forwarded_to_another_origin(db, receiver, daemon_factory):
    daemon_factory(env={"CRM_BRIDGE_REDIRECT_ALLOW_CIDRS": "127.0.0.0/8"})  # loopback: allowed for redirects
    with Receiver() as other:  # another port: another origin
        receiver.answer("/moved", Rule(status=302, headers={"Location": other.url("/elsewhere")}))
        receiver.answer("/hop", Rule(status=302, headers={"Location": "/landing"}))
        headers = Jsonb({"X-Api-Key": "k-secret-123"})
        db.add_url("customer", "create", receiver.url("/moved"), follow_redirects=True, headers=headers)
        db.add_url("customer", "create", receiver.url("/hop"), follow_redirects=True, headers=headers)
        new_customer(db)
        [away] = other.wait_for(1)
        [home] = receiver.wait_for(1, "/landing")
    assert "X-Api-Key" not in away.headers and "Idempotency-Key" in away.headers
    assert home.headers["X-Api-Key"] == "k-secret-123"


def test_https_is_never_redirected_to_plain_http(db, receiver, loopback_ca, daemon_factory):
    with Receiver(ssl_context=loopback_ca.server_context("127.0.0.1")) as secure:
        daemon_factory(env={"CRM_BRIDGE_CA_BUNDLE": str(loopback_ca.ca_path)})
        secure.answer("/moved", Rule(status=301, headers={"Location": receiver.url("/plain")}))
        tid = db.add_url("customer", "create", secure.url("/moved"), follow_redirects=True)
        new_customer(db)
        assert "redirect from https to http://127.0.0.1" in dead_error(db, tid)
    assert receiver.attempts == []


# -- address policy -----------------------------------------------------------------------------
def test_denied_addresses_are_refused_before_any_connection(db, listener_factory, daemon_factory):
    v4 = listener_factory("127.0.0.1")
    v6 = listener_factory("::1")
    daemon_factory(env=DENY_LOOPBACK)
    urls = {
        "literal": v4.url("/a"),
        "hostname": f"http://localhost:{v4.port}/b",          # checked after DNS resolution
        "mapped": f"http://[::ffff:127.0.0.1]:{v4.port}/c",    # IPv4-mapped IPv6 literal
        "v6": v6.url("/d"),
    }
    ids = {name: db.add_url("customer", "create", url) for name, url in urls.items()}
    new_customer(db)
    for name, tid in ids.items():
        error = dead_error(db, tid)
        assert "refused by the address policy, nothing was sent" in error, name
        assert "denied by the address policy" in error, name
    assert db.one("SELECT max(attempts) FROM crm_bridge.delivery") == 1
    assert (v4.accepted, v6.accepted) == (0, 0)


def test_allow_list_admits_only_listed_networks(db, listener_factory, daemon_factory):
    allowed, other = listener_factory("127.0.0.1"), listener_factory("127.0.0.2")
    daemon_factory(env={"CRM_BRIDGE_ALLOW_CIDRS": "127.0.0.1/32"})
    ok = db.add_url("customer", "create", allowed.url("/in"))
    refused = db.add_url("customer", "create", other.url("/out"))
    new_customer(db)
    assert "not in the address policy's allow list" in dead_error(db, refused)
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [ok], expect="delivered")
    assert (allowed.accepted, other.accepted) == (1, 0)


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.0.1", "fd00:ec2::254", "fe80::1",
                                     "::ffff:169.254.169.254"])
def test_metadata_and_link_local_stay_denied_whatever_deny_list_is_configured(address):
    policy = policy_from(deny=["127.0.0.2/32"], allow=["0.0.0.0/0", "::/0"])
    with pytest.raises(AddressRefused, match="denied by the address policy"):
        policy.check("metadata", address)
    policy.check("elsewhere", "127.0.0.1")  # the configured lists still work


# -- issue 10, item 12: unspecified addresses and redirects into non-public ranges ---------------
# Every spelling of 0.0.0.0 / :: the client accepts (aiohttp refuses `0`, `0.0` and `0.0.0.0.`
# itself: "is not a canonical IPv4 address").  On Linux, connecting to them reaches this host.
UNSPECIFIED_HOSTS = ["0.0.0.0", "0x0", "0x0.0", "[::]", "[0:0::0]", "[::ffff:0.0.0.0]", "[::ffff:0:0]",
                     "[::0.0.0.0]"]


def insert_unvalidated(db, url: str) -> int:
    """A crm_trigger row stored with the database's validation switched off (as a superuser can)."""
    with db.conn.transaction():
        db.execute("SET LOCAL session_replication_role = replica")
        return int(db.one("INSERT INTO crm_bridge.crm_trigger (object, event, url) VALUES ('customer', 'create', %s) "
                          "RETURNING id", [url]))


@pytest.mark.parametrize("host", UNSPECIFIED_HOSTS)
def test_unspecified_addresses_are_always_denied_before_connecting(listener_factory, host):
    import anyio

    from bridge.http import make_client

    v4, v6 = listener_factory("127.0.0.1"), listener_factory("::1")
    # The default policy, and a configuration that denies nothing and allows everything.
    policies = [policy_from((), ()), policy_from((), ("0.0.0.0/0", "::/0"))]

    async def call_all() -> list[str]:
        out = []
        for policy in policies:
            async with make_client(policy=policy) as client:
                for port in (v4.port, v6.port):
                    with pytest.raises(AddressRefused) as err:
                        await client.get(f"http://{host}:{port}/x", timeout=3)
                    out.append(str(err.value))
        return out

    for message in anyio.run(call_all):
        assert "is never a valid destination" in message
    assert (v4.accepted, v6.accepted) == (0, 0)


def test_the_daemon_refuses_unspecified_addresses_even_when_stored_unvalidated(db, listener_factory, daemon):
    v4, v6 = listener_factory("127.0.0.1"), listener_factory("::1")
    ids = [insert_unvalidated(db, f"http://0.0.0.0:{v4.port}/a"), insert_unvalidated(db, f"http://[::]:{v6.port}/b"),
           insert_unvalidated(db, f"http://0x0:{v4.port}/c")]
    new_customer(db)
    for tid in ids:
        assert "refused by the address policy, nothing was sent" in dead_error(db, tid)
    assert (v4.accepted, v6.accepted) == (0, 0)


@pytest.mark.parametrize("host", [*UNSPECIFIED_HOSTS, "0", "0.0", "0.0.0.0.", "000.0.0.0", "0x00000000", "[0::]",
                                  "[::FFFF:0.0.0.0]", "0.1.2.3", "[::ffff:0.1.2.3]"])
def test_the_database_rejects_unspecified_addresses_naming_them(db, host):
    import psycopg

    with pytest.raises(psycopg.errors.CheckViolation) as err:
        db.add_url("customer", "create", f"http://{host}:8080/hook")
    message = err.value.diag.message_primary
    assert f"host {host}" in message and ("0.0.0.0" in message or "unspecified" in message), message


@pytest.mark.parametrize("address", ["127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "172.16.0.1", "172.31.255.255",
                                     "192.168.1.1", "100.64.0.1", "fc00::1", "fd12:3456::1", "fec0::1",
                                     "::ffff:10.0.0.1", "::ffff:127.0.0.1", "224.0.0.1", "255.255.255.255",
                                     "198.18.0.1", "ff02::1"])
def test_redirect_targets_must_be_public_unless_allowed_for_redirects(address):
    from bridge.http import NotPublic

    policy = policy_from((), ())
    policy.check("configured", address)                      # the configured URL: the operator's choice
    with pytest.raises(NotPublic, match="redirect_allow_cidrs"):
        policy.for_redirects.check("redirect", address)      # a receiver's choice: public only
    opened = policy_from((), (), redirect_allow=("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12",
                                                 "192.168.0.0/16", "100.64.0.0/10", "fc00::/7", "fec0::/10",
                                                 "224.0.0.0/4", "255.255.255.255/32", "198.18.0.0/15", "ff00::/8"))
    opened.for_redirects.check("redirect", address)
    for public in ("93.184.216.34", "2606:4700::1111"):
        policy.for_redirects.check("redirect", public)


def test_redirect_to_another_loopback_origin_is_refused_before_connecting(db, receiver, listener_factory, daemon):
    inner = listener_factory("127.0.0.1")          # loopback, but another port: another origin
    receiver.answer("/moved", Rule(status=302, headers={"Location": inner.url("/internal")}))
    receiver.answer("/same", Rule(status=302, headers={"Location": "/landing"}))
    tid = db.add_url("customer", "create", receiver.url("/moved"), follow_redirects=True)
    same = db.add_url("customer", "create", receiver.url("/same"), follow_redirects=True)
    new_customer(db)
    error = dead_error(db, tid)
    assert "refused by the address policy, nothing was sent" in error
    assert "not a public address" in error and "redirect_allow_cidrs" in error
    assert inner.accepted == 0
    # A redirect within the configured URL's own origin is still followed.
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [same], expect="delivered")
    assert receiver.received("/landing")


def test_redirect_into_a_range_the_operator_allowed_for_redirects_is_followed(
        db, receiver, listener_factory, daemon_factory):
    inner = listener_factory("127.0.0.1")
    tid = redirected_call(db, receiver, daemon_factory, inner, {"CRM_BRIDGE_REDIRECT_ALLOW_CIDRS": "127.0.0.0/8"})
    db.wait_until("SELECT status FROM crm_bridge.delivery WHERE trigger_id = %s", [tid], expect="delivered")
    assert inner.accepted == 1


def test_cookies_set_by_a_receiver_are_never_sent_to_any_url(receiver):
    """The client is shared by every URL: one receiver's Set-Cookie must not travel to another URL."""
    import anyio

    from bridge.http import make_client

    receiver.answer("/a", Rule(headers={"Set-Cookie": "session=abc; Path=/"}))

    async def calls() -> None:
        async with make_client(policy=policy_from((), ())) as client:
            for path in ("/a", "/b", "/a"):
                await client.send(client.build_request("GET", receiver.url(path)))

    anyio.run(calls)
    assert [c.headers.get("Cookie") for c in receiver.received()] == [None, None, None]
