"""The engine of replication and how it starts (issue 14, docs/CLUSTER.md): real nats-server processes on
127.0.0.1 through ledger.cluster.servers.LocalCluster and `ledger cluster nats`, and the NATS connection options
of ledger.cluster.connection. No mocks of the servers: the cluster extra (in the test extra) installs them."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

import nats
import nats.errors
import pytest
from nats.js.api import StorageType, StreamConfig

from ledger.cluster import connection, servers
from ledger.cluster.connection import ConnectionOptions, connect_arguments
from ledger.cluster.servers import LocalCluster, ServerAuthorization

ACK_DEADLINE_S = 20.0   # a new stream leader is elected in a few seconds; a loaded CI machine gets room
CLI_START_TIMEOUT_S = 30.0
# A self-signed test certificate and its key (EC P-256, valid until 2126): only loaded, never served.
TEST_CERTIFICATE = """-----BEGIN CERTIFICATE-----
MIIBgzCCASmgAwIBAgIUOXkE+Rt2+G++ABPKJopG9METJe4wCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLbGVkZ2VyLXRlc3QwIBcNMjYxMjAyMDY1MjUwWhgPMjEyNjEx
MDgwNjUyNTBaMBYxFDASBgNVBAMMC2xlZGdlci10ZXN0MFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAEpQAHy8gdJwFsAWWgS3D2s8PqMKNhiIqzlaz0pWmk+r5yq1bm
2/+dN8WNybUxmelOqcu1+OEajgvdQWN8zCqr0qNTMFEwHQYDVR0OBBYEFGm2S+jb
yWl4gJOtN5O2SJC8I5hvMB8GA1UdIwQYMBaAFGm2S+jbyWl4gJOtN5O2SJC8I5hv
MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIgVAFTbz5t/a7yoDA8
100qMZYSSP08afvWAinP0o8JhBQCIQDg6rxkhliMtkBP2J1SOM4FmVcBngXT0Q4e
/L9XmMbvIg==
-----END CERTIFICATE-----
"""
TEST_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgYWSM5AjM3VL1DcbC
5AJNUbJUQ7Ld5F1ByMsmpK0hweehRANCAASlAAfLyB0nAWwBZaBLcPazw+owo2GI
irOVrPSlaaT6vnKrVubb/503xY3JtTGZ6U6py7X44RqOC91BY3zMKqvS
-----END PRIVATE KEY-----
"""


async def quiet(error: Exception) -> None:
    """nats-py's default error callback logs a traceback per failed attempt; the tests look at the outcome."""


async def connect(cluster: LocalCluster, options: ConnectionOptions | None = None, **extra) -> nats.NATS:
    arguments = connect_arguments(cluster.url, cluster.connection_options() if options is None else options)
    return await nats.connect(**arguments, connect_timeout=5, reconnect_time_wait=0.1, error_cb=quiet, **extra)


async def publish_until_acknowledged(js, subject: str, payload: bytes, message_id: str):
    """Publish until the stream acknowledges, as a client does while a new stream leader is elected. The message
    id makes the retries safe: the stream stores the message once."""
    deadline = time.monotonic() + ACK_DEADLINE_S
    while True:
        try:
            return await js.publish(subject, payload, timeout=1.0, headers={"Nats-Msg-Id": message_id})
        except (nats.errors.Error, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def listening_addresses(port: int) -> set[str]:
    """The addresses a TCP socket of this machine listens on at `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in file.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:   # 0A: LISTEN
                    if len(address) == 8:
                        found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                    else:
                        found.add(f"ipv6:{address}")
    return found


# ---- a three-server cluster --------------------------------------------------------------------------------

def test_three_servers_form_a_jetstream_cluster_on_loopback_only(tmp_path):
    with LocalCluster(tmp_path, nodes=3) as cluster:
        leaders = set()
        for spec in cluster.servers:
            meta = http_json(f"{spec.monitor_url}/jsz")["meta_cluster"]
            assert meta["cluster_size"] == 3 and meta["name"] == servers.CLUSTER_NAME
            leaders.add(meta["leader"])
            assert http_json(f"{spec.monitor_url}/jsz")["config"]["sync_always"] is True
            for port in (spec.client_port, spec.route_port, spec.monitor_port):
                assert listening_addresses(port) == {"127.0.0.1"}, (spec.name, port)
            with open(spec.pid_path) as file:
                assert int(file.read()) == cluster.pid(spec.index)
        assert len(leaders) == 1 and leaders <= {spec.name for spec in cluster.servers}
        assert cluster.url == ",".join(f"nats://127.0.0.1:{spec.client_port}" for spec in cluster.servers)
        pids = [cluster.pid(index) for index in range(3)]
    for spec, pid in zip(cluster.servers, pids):
        assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(spec.pid_path)
        assert os.path.isdir(os.path.join(spec.directory, "jetstream"))   # the store stays for the next start


def test_an_r3_stream_acknowledges_and_goes_on_acknowledging_after_its_leader_is_killed(tmp_path):
    async def scenario(cluster: LocalCluster) -> None:
        client = await connect(cluster)
        js = client.jetstream()
        await js.add_stream(StreamConfig(name="LEDGER", subjects=["ledger.>"], num_replicas=3,
                                         storage=StorageType.FILE))
        ack = await publish_until_acknowledged(js, "ledger.batch", b"first", "m1")
        assert (ack.stream, ack.seq, ack.duplicate) == ("LEDGER", 1, None)
        info = await js.stream_info("LEDGER")
        assert info.config.num_replicas == 3 and info.config.storage == StorageType.FILE
        leader = [spec.name for spec in cluster.servers].index(info.cluster.leader)
        cluster.kill(leader)                       # SIGKILL the stream's Raft leader: a crash, not a shutdown
        assert not cluster.running(leader)
        ack = await publish_until_acknowledged(js, "ledger.batch", b"second", "m2")
        assert (ack.stream, ack.seq) == ("LEDGER", 2)
        again = await publish_until_acknowledged(js, "ledger.batch", b"second", "m2")   # a retry: stored once
        assert (again.seq, again.duplicate) == (2, True)
        info = await js.stream_info("LEDGER")
        assert info.state.messages == 2 and info.cluster.leader != cluster.servers[leader].name
        assert (await js.get_msg("LEDGER", 1)).data == b"first"
        await client.close()
        cluster.start(leader)                      # back with its store: it catches up and is healthy again
        assert cluster.running(leader)

    with LocalCluster(tmp_path, nodes=3) as cluster:
        asyncio.run(scenario(cluster))


# ---- the configuration -------------------------------------------------------------------------------------

def test_the_config_syncs_every_write_and_names_only_loopback_addresses(tmp_path):
    specs = servers.server_specs(str(tmp_path), 3, 4222)
    assert [(s.client_port, s.route_port, s.monitor_port) for s in specs] == [
        (4222, 6222, 8222), (4223, 6223, 8223), (4224, 6224, 8224)]
    text = servers.server_config(specs[1], specs, None)
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
    assert "sync_interval: always" in lines
    assert f"store_dir: \"{specs[1].directory}\"" in lines
    assert 'listen: "127.0.0.1:4223"' in lines and 'http: "127.0.0.1:8223"' in lines
    assert 'listen: "127.0.0.1:6223"' in lines
    assert '"nats-route://127.0.0.1:6222"' in lines and '"nats-route://127.0.0.1:6224"' in lines
    assert '"nats-route://127.0.0.1:6223"' not in lines           # no route to itself
    addresses = {word.strip('"').split(":")[0] for line in lines for word in line.split()
                 if ":" in word.strip('"') and word[0] in '"' and "//" not in word and "/" not in word}
    assert addresses == {"127.0.0.1"}, addresses
    single = servers.server_config(servers.server_specs(str(tmp_path), 1, 4222)[0],
                                   servers.server_specs(str(tmp_path), 1, 4222), None)
    assert "cluster {" not in single and "sync_interval: always" in single
    assert 'token: "t0k$n"' in servers.server_config(specs[0], specs, ServerAuthorization(token="t0k$n"))


def test_cluster_arguments_are_checked():
    servers.check_cluster_arguments(3, 4222)
    servers.check_cluster_arguments(9, 0)
    for nodes, port in ((0, 4222), (10, 4222), (3, 80), (3, 65535 - 4000 - 1)):
        with pytest.raises(ValueError):
            servers.check_cluster_arguments(nodes, port)
    for bad in (dict(), dict(user="u"), dict(token="t", user="u", password="p"), dict(token=""),
                dict(token='a"b'), dict(token="a\\b"), dict(token="a\nb")):
        with pytest.raises(ValueError):
            ServerAuthorization(**bad)


def test_a_missing_server_binary_names_the_extra(monkeypatch):
    def not_installed(name):
        raise servers.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(servers.importlib.metadata, "distribution", not_installed)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(servers.NatsServerMissingError, match=r'\.\[cluster\]'):
        servers.server_binary()


def test_the_installed_server_is_new_enough():
    binary = servers.server_binary()
    assert servers.server_version(binary) >= servers.SERVER_VERSION_MIN
    assert servers.checked_server_binary(binary) == binary


def held_port() -> socket.socket:
    """A socket listening on a port whose monitoring port (+4000) is in range too."""
    while True:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        if holder.getsockname()[1] + servers.MONITOR_PORT_OFFSET <= servers.PORT_MAX:
            holder.listen()
            return holder
        holder.close()


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with held_port() as holder:
        with pytest.raises(servers.NatsServerStartError, match="address already in use") as raised:
            LocalCluster(tmp_path / "busy", nodes=1, port=holder.getsockname()[1]).open()
        assert "server.log" in str(raised.value) and "exited with status" in str(raised.value)
    with LocalCluster(tmp_path / "one", nodes=1):
        with pytest.raises(servers.ClusterError, match="in use by another local cluster"):
            LocalCluster(tmp_path / "one", nodes=1).open()


# ---- authentication against a live server ------------------------------------------------------------------

def test_a_token_server_accepts_the_token_and_refuses_a_client_without_it(tmp_path):
    async def scenario(cluster: LocalCluster) -> None:
        client = await connect(cluster)
        js = client.jetstream()
        await js.add_stream(StreamConfig(name="AUTH", subjects=["auth.>"], storage=StorageType.FILE))
        assert (await js.publish("auth.x", b"ok")).seq == 1
        await client.close()
        for options in (ConnectionOptions(), ConnectionOptions(token="wrong")):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await connect(cluster, options, allow_reconnect=False)

    authorization = ServerAuthorization(token="s3cret-t0ken")
    with LocalCluster(tmp_path, nodes=1, authorization=authorization) as cluster:
        assert cluster.connection_options() == ConnectionOptions(token="s3cret-t0ken")
        assert "s3cret" not in cluster.url
        asyncio.run(scenario(cluster))


# ---- connection options -> nats.connect arguments -------------------------------------------------------------

def test_urls_are_parsed_and_credentials_taken_out_of_them():
    assert connect_arguments("nats://127.0.0.1:4222") == {"servers": ["nats://127.0.0.1:4222"]}
    assert connect_arguments(" 127.0.0.1:4222 , nats://[::1]:4223,localhost")["servers"] == [
        "nats://127.0.0.1:4222", "nats://[::1]:4223", "nats://localhost:4222"]
    arguments = connect_arguments("nats://al%40ce:p%3Ass@h1:4222,nats://al%40ce:p%3Ass@h2:4222")
    assert arguments == {"servers": ["nats://h1:4222", "nats://h2:4222"], "user": "al@ce", "password": "p:ss"}
    assert connect_arguments("nats://t0ken@h1:4222") == {"servers": ["nats://h1:4222"], "token": "t0ken"}
    for bad in ("", " , ", "http://h:4222", "nats://h:99999", "nats://:4222", "nats://h:4222/path",
                "nats://u:a@h:1,nats://u:b@h:2", "nats://:pw@h:1", "nats://h:1,tls://h:2"):
        with pytest.raises(ValueError):
            connect_arguments(bad)
    with pytest.raises(ValueError) as raised:
        connect_arguments("ftp://user:hunter2@h:4222")
    assert "hunter2" not in str(raised.value) and "***" in str(raised.value)
    assert connection.redacted("nats://u:pw@h:4222") == "nats://***@h:4222"


def test_authentication_options_map_to_nats_connect_and_conflicts_are_refused(tmp_path):
    url = "nats://127.0.0.1:4222"
    assert connect_arguments(url, ConnectionOptions(user="u", password="p")) == {
        "servers": [url], "user": "u", "password": "p"}
    assert connect_arguments(url, ConnectionOptions(token="t")) == {"servers": [url], "token": "t"}
    for bad in (ConnectionOptions(user="u"), ConnectionOptions(password="p"), ConnectionOptions(token=""),
                ConnectionOptions(token="t", user="u", password="p"), ConnectionOptions(token="t", creds_file="x")):
        with pytest.raises(ValueError):
            connect_arguments(url, bad)
    with pytest.raises(ValueError, match="both the URL and the options"):
        connect_arguments("nats://u:p@127.0.0.1:4222", ConnectionOptions(token="t"))
    with pytest.raises(FileNotFoundError, match="creds file .*missing.creds does not exist"):
        connect_arguments(url, ConnectionOptions(creds_file=str(tmp_path / "missing.creds")))
    not_creds = tmp_path / "not.creds"
    not_creds.write_text("hello")
    with pytest.raises(ValueError, match="is not a creds file"):
        connect_arguments(url, ConnectionOptions(creds_file=str(not_creds)))
    with pytest.raises(ValueError, match="is not a file"):
        connect_arguments(url, ConnectionOptions(creds_file=str(tmp_path)))
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n\n"
                     "-----BEGIN USER NKEY SEED-----\nSUAM\n------END USER NKEY SEED------\n")
    assert connect_arguments(url, ConnectionOptions(creds_file=str(creds))) == {
        "servers": [url], "user_credentials": str(creds)}


def test_tls_options_build_a_verifying_context(tmp_path):
    certificate, key, garbage = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "garbage.pem"
    certificate.write_text(TEST_CERTIFICATE)
    key.write_text(TEST_KEY)
    garbage.write_text("not a certificate")
    arguments = connect_arguments("tls://127.0.0.1:4222")                # tls:// alone: the system's CAs
    assert arguments["servers"] == ["tls://127.0.0.1:4222"] and isinstance(arguments["tls"], ssl.SSLContext)
    options = ConnectionOptions(tls_ca_file=str(certificate), tls_cert_file=str(certificate),
                                tls_key_file=str(key), tls_hostname="ledger-test")
    arguments = connect_arguments("nats://127.0.0.1:4222", options)
    context = arguments["tls"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [entry["subject"] for entry in context.get_ca_certs()] == [((("commonName", "ledger-test"),),)]
    assert arguments["tls_hostname"] == "ledger-test"
    for bad in (ConnectionOptions(tls_cert_file=str(certificate)), ConnectionOptions(tls_key_file=str(key)),
                ConnectionOptions(tls_ca_file=str(garbage)),
                ConnectionOptions(tls_cert_file=str(certificate), tls_key_file=str(garbage))):
        with pytest.raises(ValueError):
            connect_arguments("nats://127.0.0.1:4222", bad)
    with pytest.raises(FileNotFoundError, match="CA file"):
        connect_arguments("nats://127.0.0.1:4222", ConnectionOptions(tls_ca_file=str(tmp_path / "none.pem")))


def test_the_command_line_options_default_to_the_nats_environment(monkeypatch):
    import argparse
    monkeypatch.setenv("NATS_TOKEN", "from-env")
    parser = argparse.ArgumentParser()
    connection.add_arguments(parser)
    assert connection.options_from_arguments(parser.parse_args([])) == ConnectionOptions(token="from-env")
    parsed = parser.parse_args(["--nats-user", "u", "--nats-password", "p", "--nats-token", "x", "--nats-creds",
                                "c", "--nats-tls-ca", "a", "--nats-tls-cert", "b", "--nats-tls-key", "k",
                                "--nats-tls-hostname", "h"])
    assert connection.options_from_arguments(parsed) == ConnectionOptions("u", "p", "x", "c", "a", "b", "k", "h")


# ---- ledger cluster nats -----------------------------------------------------------------------------------

def start_cli(directory, *options: str) -> tuple[subprocess.Popen, str]:
    """`python -m ledger cluster nats DIR --port 0 ...` and the URL it prints once JetStream is ready."""
    process = subprocess.Popen([sys.executable, "-m", "ledger", "cluster", "nats", str(directory), "--port", "0",
                                *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = process.stdout.readline().strip()   # the first line comes once JetStream is ready (bounded by its timeout)
    if not url:
        process.kill()
        pytest.fail(f"ledger cluster nats printed no URL: {process.communicate(timeout=10)}")
    return process, url


def server_pids(directory, nodes: int) -> list[int]:
    pids = []
    for k in range(1, nodes + 1):
        with open(os.path.join(directory, f"n{k}", "server.pid")) as file:
            pids.append(int(file.read()))
    return pids


def test_the_command_serves_until_sigterm_and_stops_every_server(tmp_path):
    async def publish(url: str) -> None:
        client = await nats.connect(**connect_arguments(url), connect_timeout=5, error_cb=quiet)
        js = client.jetstream()
        await js.add_stream(StreamConfig(name="CLI", subjects=["cli.>"], storage=StorageType.FILE))
        ack = await js.publish("cli.x", b"hello")
        assert (ack.stream, ack.seq) == ("CLI", 1)
        await client.close()

    directory = tmp_path / "nats"
    process, url = start_cli(directory, "--nodes", "1")
    try:
        assert url.startswith("nats://127.0.0.1:") and "," not in url
        pids = server_pids(directory, 1)
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
        asyncio.run(publish(url))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=CLI_START_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "nats-server n1 (pid" in stderr and "stopped the NATS servers" in stderr
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"nats-server {pid} outlived the command"
    assert "sync_interval: always" in (directory / "n1" / "server.conf").read_text()


def test_the_command_stops_its_servers_on_ctrl_c_with_130(tmp_path):
    directory = tmp_path / "nats"
    process, url = start_cli(directory, "--nodes", "3")
    try:
        assert len(url.split(",")) == 3
        pids = server_pids(directory, 3)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=CLI_START_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "interrupted" in stderr, stderr
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_usage_errors_exit_2_with_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    (tmp_path / "ledger" / "journal").mkdir(parents=True)
    cases = [[str(tmp_path / "x"), *arguments] for arguments in (["--nodes", "0"], ["--nodes", "10"],
                                                                  ["--port", "80"], ["--port", "65000"],
                                                                  ["--port", "70000"])]
    directories = [a_file, a_file / "below", tmp_path / "missing" / "below", tmp_path / "ledger"]
    if os.geteuid() != 0:   # root writes into a read-only directory anyway
        (tmp_path / "read-only").mkdir(mode=0o500)
        directories.append(tmp_path / "read-only")
    cases += [[str(directory)] for directory in directories]
    # The commands run side by side: each is a separate process that must refuse its arguments on its own
    # (nine interpreter starts one after another were most of this test's time).
    children = [subprocess.Popen([sys.executable, "-m", "ledger", "cluster", "nats", *case], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL) for case in cases]
    for case, child in zip(cases, children):
        stdout, stderr = child.communicate(timeout=60)
        assert child.returncode == 2 and len(stderr.splitlines()) == 1, (case, child.returncode, stdout, stderr)
    assert not (tmp_path / "x").exists()
