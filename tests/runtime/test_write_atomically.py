"""``write_atomically`` from the event loop and a worker thread at once (the pins file
is written by both): neither write fails, the file is always one whole table."""

from __future__ import annotations

import threading

import msgpack

from dsnode.runtime.main import write_atomically


def test_concurrent_writers_of_one_file_never_fail(tmp_path):
    path = tmp_path / "members.msgpack"
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        try:
            for i in range(150):
                write_atomically(path, {"writer": tag, "i": i})
        except BaseException as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = msgpack.unpackb(path.read_bytes(), raw=False)
    assert got["i"] == 149 and got["writer"] in "ab"
    assert not list(tmp_path.glob("*.tmp"))
