"""Node configuration: identity, secret, names, peers, and the data-dir lock."""
import stat

import pytest

from reconciler.config import ConfigError, DataDirLock, build_config, parse_peers, sanitize_name


def config_for(tmp_path, **overrides):
    args = dict(name="n1", data_dir=str(tmp_path / "d"), host="127.0.0.1", advertise_host=None,
                api_port=52415, raft_port=None, peers=None, secret_flag=None)
    args.update(overrides)
    return build_config(**args)


def test_hostname_is_sanitized_to_a_dns_label():
    assert sanitize_name("My_Mac.local") == "my-mac"
    assert sanitize_name("___") == "node"


def test_bad_peer_entry_is_named_in_the_error():
    with pytest.raises(ConfigError, match="'host-without-port'"):
        parse_peers("a:1,host-without-port")


def test_first_node_generates_a_private_secret_and_keeps_its_identity(tmp_path, monkeypatch):
    monkeypatch.delenv("EXO_CLUSTER_SECRET", raising=False)
    config, lock = config_for(tmp_path)
    lock.release()
    assert config.secret_generated and config.raft_port == 52416 and config.data_port == 52417
    assert stat.S_IMODE((config.data_dir / "cluster-secret").stat().st_mode) == 0o600
    again, lock = config_for(tmp_path)
    lock.release()
    assert (again.secret, again.node_id, again.secret_generated) == (config.secret, config.node_id, False)


def test_joining_node_without_a_secret_is_told_where_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("EXO_CLUSTER_SECRET", raising=False)
    with pytest.raises(ConfigError, match="--cluster-secret"):
        config_for(tmp_path, peers="127.0.0.1:52415")


def test_a_locked_data_dir_cannot_be_locked_again(tmp_path):
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another exo process"):
            DataDirLock(tmp_path).acquire()
    finally:
        first.release()
    DataDirLock(tmp_path).acquire()
