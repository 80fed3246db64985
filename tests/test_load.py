"""Load, safety and limits of the running app: bounded queue, bounded memory and outputs, safe file serving."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from gradio_client import Client

from tests.helpers import generate_over_http, read_video, running_app

CLIENTS = 20
MAX_OUTPUTS = 12


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def generate(url, face, seed):
    return generate_over_http(Client(url, verbose=False), face, seed=seed)


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_kit):
    folder = tmp_path_factory.mktemp("load")
    # One address sends every request here: the per-visitor cap (tests/test_serving.py) is lifted.
    with running_app(folder, "--max-outputs", str(MAX_OUTPUTS), "--max-jobs-per-visitor", "100") as (url, proc):
        yield url, proc, folder / "outputs" / "idanimator-outputs"


def test_twenty_concurrent_clients_all_succeed_or_are_told_busy(app, astronaut_path):
    url, proc, outputs = app
    generate(url, astronaut_path, 0)  # warm: models loaded, first request served
    baseline = rss_mb(proc.pid)
    results, errors = [], []

    def one(seed):
        try:
            results.append(read_video(generate(url, astronaut_path, seed)[2]).shape[0])
        except Exception as exc:  # noqa: BLE001 - classified below
            errors.append(str(exc))

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(1, CLIENTS + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) + len(errors) == CLIENTS
    assert all(frames == 8 for frames in results) and results
    assert all("Queue is full" in e and "try again" in e for e in errors), errors[:3]
    assert proc.poll() is None
    growth = rss_mb(proc.pid) - baseline
    assert growth < 400, f"server memory grew by {growth:.0f} MB over {CLIENTS} requests"
    kept = list(outputs.iterdir())
    assert len(kept) <= MAX_OUTPUTS + 3, f"{len(kept)} files kept"  # + one run's segments and video


def test_only_the_apps_own_files_are_served(app):
    url, _, _ = app
    for path in ("/etc/passwd", "/root/.bashrc"):
        for route in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(f"{url}{route}{path}", timeout=10) as response:
                    body = response.read()
                assert b"root:" not in body and response.status != 200
            except urllib.error.HTTPError as exc:
                assert exc.code in (403, 404)


def test_oversized_upload_is_refused_by_the_server(app, tmp_path):
    """Sent straight to the upload route (gradio_client would refuse it before sending): the server's limit."""
    url, proc, _ = app
    boundary = "idanimatorboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = head + b"\x89PNG\r\n\x1a\n" + b"\0" * (21 * 1024 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    upload = urllib.request.Request(
        f"{url}gradio_api/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(upload, timeout=60)
    assert refused.value.code == 413
    assert "File size exceeded maximum allowed size of 20971520 bytes" in refused.value.read().decode()
    assert proc.poll() is None
