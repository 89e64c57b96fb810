"""`atomic_write`: whole or nothing, and files get the user's umask, not mkstemp's 0600."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fourdthinker.atomic import atomic_write, atomic_write_json, atomic_write_jsonl


def test_text_bytes_json_and_jsonl_round_trip(tmp_path):
    assert atomic_write(tmp_path / "a" / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert atomic_write(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"
    assert json.loads(atomic_write_json(tmp_path / "c.json", {"k": [1, "é"]}).read_text()) == {"k": [1, "é"]}
    rows = [{"i": i} for i in range(3)]
    lines = atomic_write_jsonl(tmp_path / "d.jsonl", iter(rows)).read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_take_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "f.txt", "x")
        via_callable = atomic_write(tmp_path / "g.txt", lambda p: p.write_text("y"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(via_callable.stat().st_mode) == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "f.txt", "old")

    def boom(path):
        path.write_text("half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
