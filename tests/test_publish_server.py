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
    assert on_disk == server_config("${APT_STREAM_TILED_DATA}")
    env = {"APT_STREAM_TILED_DATA": str(tmp_path), "TILED_SINGLE_USER_API_KEY": "abc123"}
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
