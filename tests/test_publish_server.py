"""Tiled endpoints, connections and the deployable server configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apt_stream.errors import ConfigError, ServiceError
from apt_stream.plugins.tiled import check_server_config, server_config, write_server_config
from apt_stream.publish import TiledEndpoint, check_writable, connect, endpoint_from_env

DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "tiled-config.yml"


def test_endpoint_never_shows_its_key():
    endpoint = TiledEndpoint(uri="http://127.0.0.1:8000/api/v1", api_key="s3cr3tkey")
    assert "s3cr3tkey" not in repr(endpoint) and "s3cr3tkey" not in str(endpoint)
    assert endpoint.is_loopback


@pytest.mark.parametrize(
    ("uri", "message"),
    [("127.0.0.1:8000", "http"), ("ftp://host/api/v1", "http"),
     ("http://host:8000/api/v1?api_key=abc", "APT_STREAM_TILED_API_KEY")],
)
def test_endpoint_rejects_bad_uris(uri, message):
    with pytest.raises(ConfigError, match=message):
        TiledEndpoint(uri=uri, api_key="k")


def test_endpoint_from_env():
    assert endpoint_from_env({}) is None
    env = {"APT_STREAM_TILED_URI": "https://tiled.example.org/api/v1",
           "APT_STREAM_TILED_API_KEY": "abc"}
    endpoint = endpoint_from_env(env)
    assert endpoint.uri == env["APT_STREAM_TILED_URI"] and endpoint.api_key == "abc"
    assert not endpoint.is_loopback


def test_wrong_key_is_refused_without_echoing_it(tiled_server):
    wrong = TiledEndpoint(uri=tiled_server.uri, api_key="notthekey123")
    with pytest.raises(ServiceError) as info:
        check_writable(wrong)
    assert tiled_server.uri in str(info.value)
    assert "notthekey123" not in str(info.value)


def test_unreachable_server_is_a_service_error():
    import stamina

    # A port nothing listens on; one attempt instead of Tiled's 45 s of retries.
    with stamina.set_testing(True, attempts=1), pytest.raises(ServiceError, match="cannot use"):
        connect(TiledEndpoint(uri="http://127.0.0.1:9/api/v1", api_key="k"), timeout_s=1)


def test_check_writable_stamps_one_container(tiled_server):
    first = check_writable(tiled_server)
    second = check_writable(tiled_server)
    assert first["uri"] == tiled_server.uri and second["server_version"]
    from tiled.queries import Key

    root = connect(tiled_server)
    assert root["apt-stream-flight-check"].metadata["last_check"]
    assert len(root.search(Key("purpose") == "flight check")) == 1


def test_deploy_config_is_the_helpers_config_and_valid(tmp_path):
    on_disk = yaml.safe_load(DEPLOY_CONFIG.read_text())
    assert on_disk == server_config("${APT_STREAM_TILED_DATA}",
                                    readable_storage=["${APT_STREAM_DATA_ROOT}"])
    env = {"APT_STREAM_TILED_DATA": str(tmp_path), "APT_STREAM_DATA_ROOT": str(tmp_path),
           "TILED_SINGLE_USER_API_KEY": "abc123"}
    checked = check_server_config(DEPLOY_CONFIG, environ=env)
    assert checked == {"host": "127.0.0.1", "port": 8000, "uri": f"sqlite:///{tmp_path}/catalog.db"}


def test_check_server_config_names_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="TILED_SINGLE_USER_API_KEY"):
        check_server_config(DEPLOY_CONFIG, environ={"APT_STREAM_TILED_DATA": "/x"})
    with pytest.raises(ConfigError, match="APT_STREAM_TILED_DATA"):
        check_server_config(DEPLOY_CONFIG, environ={"TILED_SINGLE_USER_API_KEY": "k"})
    with pytest.raises(ConfigError, match="port"):
        write_server_config(tmp_path / "config.yml", tmp_path / "data", port=70000)
    written = write_server_config(tmp_path / "config.yml", tmp_path / "data", port=8123)
    assert check_server_config(written, environ={"TILED_SINGLE_USER_API_KEY": "k"})["port"] == 8123
    written.write_text("trees: [{path: /, tree: catalog, args: {uri: 1}}]\nbogus: 1\n")
    with pytest.raises(ConfigError, match="not a valid Tiled config"):
        check_server_config(written, environ={"TILED_SINGLE_USER_API_KEY": "k"})
    with pytest.raises(ConfigError, match="does not exist"):
        check_server_config(tmp_path / "nope.yml", environ={"TILED_SINGLE_USER_API_KEY": "k"})


# -- secrets stay out of logs; anonymous and read-only clients cannot write ----------------------
MULTIUSER_CONFIG = DEPLOY_CONFIG.parent / "tiled-multiuser.yml"


def test_redact_keys_urls_and_credentials():
    from apt_stream.publish.server import redact

    assert redact("GET /api/v1/?api_key=abc123def&x=1") == "GET /api/v1/?api_key=***&x=1"
    assert redact("GET /x?api_key%3Dabc123") == "GET /x?api_key%3D***"
    assert redact("Authorization: Apikey " + "ab" * 16) == "Authorization: Apikey ***"
    assert redact("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln") == "Bearer ***"
    assert redact("the key is s3cr3tkey!", ["s3cr3tkey"]) == "the key is ***!"
    # Request lines naming the apikey route are not credentials.
    line = "POST /api/v1/auth/principal/123/apikey HTTP/1.1"
    assert redact(line) == line
    assert redact("a k b", ["k"]) == "a k b"  # too short to be a key: not replaced


def test_redacting_stream_and_filter_catch_split_and_formatted_keys():
    import io
    import logging

    from apt_stream.publish.server import RedactingFilter, RedactingStream

    sink = io.StringIO()
    stream = RedactingStream(sink, ["deadbeefcafe"])
    stream.write("http://h:1?api_key=dead")  # the key split over two writes
    stream.write("beefcafe\nnext ")
    stream.flush()
    assert sink.getvalue() == "http://h:1?api_key=***\nnext "

    record = logging.LogRecord("tiled", logging.INFO, __file__, 1, "%s asked %s (%d)",
                               ("127.0.0.1", "/x?api_key=deadbeefcafe", 200), None)
    assert RedactingFilter(["deadbeefcafe"]).filter(record)
    assert record.getMessage() == "127.0.0.1 asked /x?api_key=*** (200)"


def test_embedded_server_refuses_anonymous_clients_and_keeps_keys_out_of_its_logs(tmp_path):

    from apt_stream.publish.server import local_tiled_server

    # A server of its own: uvicorn's access logger is process-wide, so the newest embedded
    # server in a process gets every server's access lines (docs/reliability.md).
    with local_tiled_server(tmp_path / "tiled") as tiled_server:
        _requests_with_and_without_a_key(tiled_server)
    access = (tiled_server.data_dir / "access.log").read_text()
    assert "api_key=***" in access
    for name in ("access.log", "error.log"):
        assert tiled_server.api_key not in (tiled_server.data_dir / name).read_text()


def _requests_with_and_without_a_key(tiled_server) -> None:
    import httpx

    with httpx.Client(trust_env=False, timeout=10) as client:
        anonymous_write = client.post(f"{tiled_server.uri}/metadata/", json={
            "structure_family": "container", "metadata": {}, "specs": []})
        assert anonymous_write.status_code in (401, 403)
        assert client.get(f"{tiled_server.uri}/metadata/").status_code in (401, 403)
        with_key = client.get(f"{tiled_server.uri}/metadata/?api_key={tiled_server.api_key}")
        assert with_key.status_code == 200


def test_launcher_refuses_keys_on_the_command_line_and_generated_keys(tmp_path, monkeypatch,
                                                                      capsys):
    from apt_stream.publish.__main__ import main

    monkeypatch.setenv("APT_STREAM_TILED_DATA", str(tmp_path))
    monkeypatch.delenv("TILED_SINGLE_USER_API_KEY", raising=False)
    assert main(["serve", str(DEPLOY_CONFIG), "--api-key", "abc123"]) == 2
    assert "process list" in capsys.readouterr().err
    assert main(["serve", str(DEPLOY_CONFIG)]) == 2
    assert "TILED_SINGLE_USER_API_KEY is not set" in capsys.readouterr().err
    assert main(["bogus"]) == 2 and "usage" in capsys.readouterr().err


def test_multiuser_read_only_key_reads_but_cannot_write(tmp_path, monkeypatch):
    """deploy/tiled-multiuser.yml for real: the admin logs in, makes a pipeline key and a
    read-only key; the pipeline writes, the reader reads and is refused every write."""
    import secrets

    import httpx
    import numpy as np

    from apt_stream.plugins.tiled import serve_config

    password, secret_key = secrets.token_hex(12), secrets.token_hex(32)
    monkeypatch.setenv("TILED_ADMIN_PASSWORD", password)
    monkeypatch.setenv("TILED_SECRET_KEY", secret_key)
    with serve_config(MULTIUSER_CONFIG, data_dir=tmp_path / "tiled") as (server, _proc), \
            httpx.Client(trust_env=False, timeout=30) as http:
        base = server.uri
        assert http.get(f"{base}/metadata/").status_code == 401  # anonymous reads refused
        assert http.post(f"{base}/metadata/", json={}).status_code == 401
        login = http.post(f"{base}/auth/provider/local/token",
                          data={"username": "apt-admin", "password": password})
        assert login.status_code == 200
        admin = {"Authorization": f"Bearer {login.json()['access_token']}"}

        def key_for(scopes: list[str], note: str) -> str:
            principal = http.post(f"{base}/auth/principal", params={"role": "user"},
                                  headers=admin).json()
            made = http.post(f"{base}/auth/principal/{principal['uuid']}/apikey", headers=admin,
                             json={"scopes": scopes, "expires_in": None, "note": note})
            assert made.status_code == 200, made.text
            return made.json()["secret"]

        pipeline_key = key_for(["read:metadata", "read:data", "write:metadata", "write:data",
                                "create:node", "delete:node", "delete:revision"], "pipeline")
        reader_key = key_for(["read:metadata", "read:data"], "alice")

        pipeline = TiledEndpoint(uri=base, api_key=pipeline_key)
        assert check_writable(pipeline)["uri"] == base
        scan = connect(pipeline).create_container(key="scan-1", metadata={"status": "done"})
        scan.write_array(np.arange(6.0), key="apt")

        reader = TiledEndpoint(uri=base, api_key=reader_key)
        root = connect(reader)
        assert root["scan-1"].metadata["status"] == "done"
        np.testing.assert_array_equal(root["scan-1"]["apt"].read(), np.arange(6.0))
        with pytest.raises(Exception, match="401"):
            root.create_container(key="scan-2")
        with pytest.raises(Exception, match="401"):
            root["scan-1"].update_metadata(metadata={"status": "tampered"})
        with pytest.raises(ServiceError, match="refused a write"):
            check_writable(reader)
        # Nor can the reader mint itself a broader key.
        minted = http.post(f"{base}/auth/apikey", headers={"Authorization": f"Apikey {reader_key}"},
                           json={"scopes": ["inherit"], "expires_in": None})
        assert minted.status_code in (401, 403)
        assert root["scan-1"].metadata["status"] == "done"
    log_text = (tmp_path / "tiled" / "server.log").read_text()
    for secret in (password, secret_key, pipeline_key, reader_key):
        assert secret not in log_text


def test_two_embedded_servers_in_one_process_keep_their_own_keys(tmp_path):
    """Tiled keeps app settings in one cached object per process: without a fresh one per
    server, the second embedded server's key replaced the first's (the demo inside a test
    session, or a listener and a demo in one notebook, got 401 on the first)."""
    from apt_stream.errors import ServiceError
    from apt_stream.publish.server import TiledEndpoint, connect, local_tiled_server

    with local_tiled_server(tmp_path / "a") as a:
        connect(a).create_container(key="first")
        with local_tiled_server(tmp_path / "b") as b:
            assert list(connect(b)) == []
            assert list(connect(a)) == ["first"]
            with pytest.raises(ServiceError, match="401"):
                connect(TiledEndpoint(uri=a.uri, api_key=b.api_key))
        assert list(connect(a)) == ["first"]
