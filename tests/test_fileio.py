import shutil
from pathlib import Path

from pipeline import fileio
from pipeline.fileio import free_bytes, human_bytes


def test_disk_sizes_read_as_people_write_them():
    assert [human_bytes(n) for n in (512, 1536, 5 * 2**30, 4.6e12)] == ["512 B", "1.5 KiB", "5.0 GiB", "4.2 TiB"]


def test_free_space_of_a_directory_not_made_yet_is_that_of_its_nearest_parent(tmp_path: Path, monkeypatch):
    asked = []
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: asked.append(path) or shutil._ntuple_diskusage(9, 2, 7))
    assert free_bytes(tmp_path / "no" / "such" / "dir") == 7
    assert asked == [tmp_path]
