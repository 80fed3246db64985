"""Safety: secrets stay out of output, interrupted builds never look complete."""

from __future__ import annotations

import subprocess
import sys

from idanimator.testing import build_tiny_kit


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
