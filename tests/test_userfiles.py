"""Reading the files a user names: every problem is one LlamatierError naming the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamatier.demo import read_prompt_file
from llamatier.errors import LlamatierError, ProfileError
from llamatier.hardware import load_profile
from llamatier.serving import WorkloadError, load_workload


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "missing.txt", "not found"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "latin1.txt").write_bytes(b"caf\xe9") and d / "latin1.txt", "not UTF-8"),
        (lambda d: (d / "bad.toml").write_text("a = [1,") and d / "bad.toml", "not valid TOML"),
    ],
)
def test_every_reader_gives_one_line(tmp_path: Path, make, needle: str) -> None:  # noqa: ANN001
    path = make(tmp_path)
    readers = [(load_workload, WorkloadError, "workload file"), (load_profile, ProfileError, "profile")]
    if needle != "not valid TOML":
        readers.append((read_prompt_file, LlamatierError, "prompt file"))
    for read, error, what in readers:
        if read is load_profile and needle == "not found":
            path = tmp_path / "missing.toml"  # a bare word is a profile name, not a path
        with pytest.raises(error) as info:
            read(path)
        msg = str(info.value)
        assert needle in msg and what in msg and str(path) in msg and "\n" not in msg, msg
