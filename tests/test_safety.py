"""Safety: secrets stay out of output, interrupted builds never look complete."""

from __future__ import annotations

import subprocess
import sys

from idanimator.tiny import build_tiny_kit


def test_hf_token_is_sent_to_the_hub_but_never_printed(tmp_path):
    """`download` against a local stand-in for the Hub: the token must reach the server (so this path really
    reads it) and must appear nowhere in what the user sees, even when every download fails."""
    import http.server
    import threading

    secret = "hf_SENTINELsecretTOKEN1234567890"
    seen: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def answer(self):
            seen.append(self.headers.get("authorization", ""))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "HF_TOKEN": secret,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    try:
        for argv in (["download"], ["backbones"]):
            proc = subprocess.run(
                [sys.executable, "-m", "idanimator", *argv], capture_output=True, text=True, env=env, timeout=120
            )
            assert secret not in proc.stdout + proc.stderr
            if argv == ["download"]:
                assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    finally:
        server.shutdown()
    assert any(secret in header for header in seen), seen


def test_a_half_built_kit_is_rebuilt_not_trusted(tmp_path):
    root = tmp_path / "kit"
    (root / "base").mkdir(parents=True)  # what an interrupted build would leave without the marker
    paths = build_tiny_kit(root)
    assert (root / "kit.json").is_file()
    assert (paths["base"] / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if "building" in p.name]


def _make_tiny(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "idanimator", "make-tiny", *argv], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_make_tiny_never_deletes_a_folder_that_is_not_a_kit(tmp_path):
    """Issue 18: `make-tiny DIR` (with or without --force, and `make-tiny .`) on a folder of the user's own files
    is refused with one sentence and leaves every file; a file, or a path under a file, is named as a file."""
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "mine.txt").write_text("mine")
    (tmp_path / "afile").write_text("a file")
    for argv, cwd, said in (
        ([str(mine)], None, "already holds files and is not a tiny kit"),
        ([str(mine), "--force"], None, "already holds files and is not a tiny kit"),
        (["."], mine, "already holds files and is not a tiny kit"),
        ([str(tmp_path / "afile")], None, "is a file, not a folder"),
        ([str(tmp_path / "afile" / "kit")], None, "afile is a file, not a folder"),
    ):
        proc = _make_tiny(*argv, cwd=cwd)
        assert proc.returncode == 1, (argv, proc.stderr)
        assert proc.stderr.startswith("error: ") and said in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert [p.name for p in mine.iterdir()] == ["mine.txt"] and (mine / "mine.txt").read_text() == "mine"
    assert (tmp_path / "afile").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d"]  # no half-built folder left beside


def test_make_tiny_uses_an_empty_folder_and_force_rebuilds_only_a_kit(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _make_tiny(".", cwd=empty)
    assert proc.returncode == 0, proc.stderr
    assert (empty / "kit.json").is_file()
    (empty / "notes.txt").write_text("kept? no: a kit's folder is the kit's")
    stamp = (empty / "kit.json").stat().st_mtime_ns
    proc = _make_tiny(str(empty), "--force")
    assert proc.returncode == 0, proc.stderr
    assert (empty / "kit.json").stat().st_mtime_ns != stamp and (empty / "base" / "model_index.json").is_file()


def test_atomic_folder_refuses_to_replace_what_it_did_not_build(tmp_path):
    from idanimator.errors import IDAnimatorError
    from idanimator.files import atomic_folder

    target = tmp_path / "target"
    target.mkdir()
    (target / "photo.jpg").write_bytes(b"not ours")
    built = []
    try:
        with atomic_folder(target, marker="built.json", what="a test folder") as work:
            built.append(work)
    except IDAnimatorError as exc:
        assert "is not a test folder" in str(exc)
    else:
        raise AssertionError("a folder without the marker was replaced")
    assert not built and (target / "photo.jpg").read_bytes() == b"not ours"
    (target / "photo.jpg").unlink()
    with atomic_folder(target, marker="built.json") as work:  # an empty folder may be used
        (work / "built.json").write_text("{}")
    with atomic_folder(target, marker="built.json") as work:  # and what it built may be rebuilt
        (work / "built.json").write_text("{}")
        (work / "again").write_text("")
    assert sorted(p.name for p in target.iterdir()) == ["again", "built.json"]
