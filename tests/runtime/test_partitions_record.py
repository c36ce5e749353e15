"""P is recorded in the data directory when it is created; a later start that sets
another P is refused, one that does not uses the recorded value; a data directory from
before partitions is one partition on every member (issue 8 part 1)."""

from __future__ import annotations

import msgpack
import pytest

from dsnode.config import load_config
from dsnode.runtime.main import (
    IDENTITY_FILE,
    StartupError,
    check_identity,
    prepare_data_dir,
    record_partitions,
)

PEERS = "n1=127.0.0.1:7001,n2=127.0.0.1:7002,n3=127.0.0.1:7003"


def _start(tmp_path, **settings):
    cfg = load_config({"node_id": "n1", "data_dir": str(tmp_path / "d"), "peers": PEERS,
                       **settings}, {})
    d = prepare_data_dir(cfg)
    peers, _ = check_identity(cfg, d)
    return record_partitions(cfg, d, peers), d


def test_a_new_directory_records_the_settings(tmp_path):
    assert _start(tmp_path, partitions="16", replication="2")[0] == (16, 2)
    assert _start(tmp_path)[0] == (16, 2)  # not set: the recorded value
    assert _start(tmp_path, partitions="16")[0] == (16, 2)


def test_another_partition_count_is_refused(tmp_path):
    _start(tmp_path, partitions="16")
    with pytest.raises(StartupError, match="partitions = 16.*partitions = 64"):
        _start(tmp_path, partitions="64")


def test_a_directory_from_before_partitions_is_one_partition_on_every_member(tmp_path):
    _, d = _start(tmp_path)
    have = msgpack.unpackb((d / IDENTITY_FILE).read_bytes())
    del have["partitions"], have["replication"]
    have["cluster_uuid"] = "ab" * 16  # it had formed a cluster
    (d / IDENTITY_FILE).write_bytes(msgpack.packb(have))
    assert _start(tmp_path)[0] == (1, 3)


def test_a_corrupt_record_is_a_startup_error(tmp_path):
    _, d = _start(tmp_path)
    have = msgpack.unpackb((d / IDENTITY_FILE).read_bytes())
    have["partitions"] = "lots"
    (d / IDENTITY_FILE).write_bytes(msgpack.packb(have))
    with pytest.raises(StartupError, match="corrupt"):
        _start(tmp_path)
