"""PostgreSQL service helpers that need no server."""

from __future__ import annotations


def test_unreachable_parent_finds_a_private_folder_on_the_path(tmp_path) -> None:
    import os
    import pwd

    from tlpipe.services import unreachable_parent

    private = tmp_path / "private"
    (private / "venv" / "bin").mkdir(parents=True)
    os.chmod(private, 0o700)
    other = next((e.pw_name for e in pwd.getpwall() if e.pw_uid not in (0, os.getuid())), None)
    assert unreachable_parent(private / "venv" / "bin", None) is None
    if other is not None and os.stat(tmp_path).st_mode & 0o001:
        assert unreachable_parent(private / "venv" / "bin", other) == private.resolve()
