"""Settings: precedence flags > env > TOML > defaults, and one clear error per problem."""

import pytest

from dsnode.config import ConfigError, NodeConfig, load_config


def write(tmp_path, text):
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_defaults_describe_a_one_node_cluster():
    c = load_config({}, {})
    assert c.node_id == "n1" and c.cluster_peers == {"n1": "127.0.0.1:7379"}
    assert c.fsync is True and c.max_frame_bytes == 8 * 1024 * 1024
    assert str(c.data_path) == "dsnode-data/n1"


def test_precedence_is_flags_then_env_then_file_then_defaults(tmp_path):
    f = write(tmp_path, 'node_id = "fromfile"\nlisten = "127.0.0.1:1"\nmax_key_bytes = 10\n'
                       'cluster_id = "filecluster"\n')
    env = {"DSNODE_LISTEN": "127.0.0.1:2", "DSNODE_MAX_KEY_BYTES": "20", "DSNODE_NODE_ID": "fromenv"}
    c = load_config({"max_key_bytes": "30"}, env, f)
    assert c.max_key_bytes == 30  # flag
    assert c.listen == "127.0.0.1:2" and c.node_id == "fromenv"  # env
    assert c.cluster_id == "filecluster"  # file
    assert c.max_txn_ops == 128  # default


def test_config_file_can_come_from_env(tmp_path):
    f = write(tmp_path, 'node_id = "x1"\n')
    assert load_config({}, {"DSNODE_CONFIG": str(f)}).node_id == "x1"


def test_every_setting_has_an_env_var_and_a_toml_key(tmp_path):
    for name in NodeConfig.model_fields:
        assert name == name.lower() and " " not in name


@pytest.mark.parametrize(
    "flags, env, toml, needle",
    [
        ({"node_id": "Bad!"}, {}, None, "node_id"),
        ({}, {"DSNODE_MAX_KEY_BYTES": "many"}, None, "max_key_bytes"),
        ({}, {"DSNODE_FSYNC": "perhaps"}, None, "fsync"),
        ({"listen": "nowhere"}, {}, None, "listen"),
        ({"listen": "127.0.0.1:70000"}, {}, None, "listen"),
        ({"peers": "n1=127.0.0.1:1,n1=127.0.0.1:2"}, {}, None, "twice"),
        ({"peers": "n2=127.0.0.1:1"}, {}, None, "not in the peer list"),
        ({"log_format": "xml"}, {}, None, "log_format"),
        ({}, {}, "bogus = 1\n", "unknown setting 'bogus'"),
        ({}, {}, 'max_key_bytes = "1"\n', "max_key_bytes"),
        ({}, {}, "fsync = 1\n", "fsync"),
        ({}, {}, "node_id = \n", "not valid TOML"),
        ({"max_frame_bytes": "0"}, {}, None, "max_frame_bytes"),
        ({"partitions": "0"}, {}, None, "partitions"),
        ({"partitions": "4097"}, {}, None, "partitions"),
        ({}, {"DSNODE_PARTITIONS": "many"}, None, "partitions"),
        ({}, {}, "partitions = 64.5\n", "partitions"),
        ({"replication": "0"}, {}, None, "replication"),
        ({"replication": "17"}, {}, None, "replication"),
        ({}, {}, 'replication = "3"\n', "replication"),
        ({"join": "nowhere"}, {}, None, "join"),
        ({}, {"DSNODE_JOIN": "h:1,h:0"}, None, "join"),
        ({}, {}, "join = [7]\n", "join"),
        ({"join": "h:1", "peers": "n1=127.0.0.1:1"}, {}, None, "not both"),
        ({"moves_max": "0"}, {}, None, "moves_max"),
        ({}, {"DSNODE_LEAVE_ON_STOP": "maybe"}, None, "leave_on_stop"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_setting(tmp_path, flags, env, toml, needle):
    f = write(tmp_path, toml) if toml is not None else None
    with pytest.raises(ConfigError) as e:
        load_config(flags, env, f)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, {}, tmp_path / "nope.toml")


def test_ms_settings_convert_to_ticks_once():
    c = load_config({"tick_interval_ms": "10", "election_timeout_ms": "505"}, {})
    assert c.ticks(c.election_timeout_ms) == 50 and c.ticks(1) == 1


def test_partitions_and_replication_default_to_64_and_3_and_take_every_source(tmp_path):
    """Issue 8: P (default 64, 1..4096) and R (default 3, 1..16); not used by the node yet."""
    c = load_config({}, {})
    assert (c.partitions, c.replication) == (64, 3)
    f = write(tmp_path, "partitions = 256\nreplication = 5\n")
    assert (load_config({}, {}, f).partitions, load_config({}, {}, f).replication) == (256, 5)
    c = load_config({"partitions": "4096"}, {"DSNODE_REPLICATION": "1"}, f)
    assert (c.partitions, c.replication) == (4096, 1)


def test_join_takes_several_addresses_from_every_source(tmp_path):
    assert load_config({"join": "a:1,b:2"}, {}).join == ["a:1", "b:2"]
    assert load_config({}, {"DSNODE_JOIN": "c:3"}).join == ["c:3"]
    f = write(tmp_path, 'join = ["d:4", "e:5"]\nleave_on_stop = true\nmoves_max = 8\n')
    c = load_config({}, {}, f)
    assert c.join == ["d:4", "e:5"] and c.leave_on_stop and c.moves_max == 8
    assert load_config({}, {}).join is None
