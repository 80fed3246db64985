"""CPU benchmark on the tiny kit: every figure is a ratio of two things measured side by side in this run.

    python benchmarks/cpu.py [--quick] [--json] [--repeats N]

* ``warm_speedup``: the first request to a fresh studio (after the imports, before any model is loaded: it
  loads the face detector, the shared parts and the backbone) / a later request.  Target: >= 5.
* ``switch_vs_cold``: a backbone switch (the shared parts stay) / a cold load (a fresh model service),
  each way between the kit's two backbones, "tiny" (a diffusers folder) and "tiny-single-file" (the same
  weights as one original-layout file).  Target: <= 0.5.
* ``face_path_ratio``: our pipeline (face photo crop -> CLIP image encoder -> resampler -> face attention,
  per-frame motion norms) / diffusers' stock ``AnimateDiffPipeline`` on the same weights and settings,
  both from prompt to decoded frames: what the face adapter path costs.
* ``serving_overhead_ratio``: a full request through the running app (``app.py --tiny`` in a subprocess,
  called with gradio_client: upload, queue, progress and previews, streamed segments, the MP4, the
  download) / the bare library call in this process (``IDAnimatorPipeline`` on the photo, then
  ``write_mp4``), same settings.  Target: <= 1.10.
* ``peak_rss_mb``: the app server's peak resident memory (``serving_peak_rss_mb``) after its requests; the
  benchmark process's own is ``bench_peak_rss_mb``.

Timings alternate between the two sides of each ratio and take medians. ``--quick``: one repeat, smaller
requests (the test suite's smoke run; figures are noisier). ``--json``: one JSON object on stdout, nothing
else (progress goes to stderr). Writes only temporary files, removed at exit; the tiny kit is built once
(in ``$IDANIMATOR_CACHE``, as ``--tiny`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"serving_overhead_ratio": ("<=", 1.10), "warm_speedup": (">=", 5.0), "switch_vs_cold": ("<=", 0.5)}
PROMPT = "a person smiling"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(function: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def face_photo(folder: Path) -> Path:
    """A real face photo (scikit-image's astronaut, public domain) as a PNG file, as a user uploads it."""
    from PIL import Image
    from skimage import data

    path = folder / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


# -- in this process: cold and warm requests, cold loads and switches, the face path ----------------


def cold_and_warm(photo: Path, output_dir: Path, request: dict, repeats: int) -> dict:
    """The first request to a fresh studio, then warm ones (what the app's Studio does for each request)."""
    from idanimator.studio import Finished, Request, Studio, StudioOptions

    def run(studio) -> None:
        events = list(studio.run(Request(faces=[str(photo)], prompt=PROMPT, backbone="tiny", seed=1, **request)))
        assert isinstance(events[-1], Finished)

    def first_request():
        studio = Studio(StudioOptions(tiny=True, device="cpu", output_dir=output_dir))
        run(studio)
        return studio

    cold, studio = timed(first_request)
    warm = [timed(lambda: run(studio))[0] for _ in range(max(2, repeats))]
    return {"cold_request_s": cold, "warm_request_s": median(warm), "studio": studio}


def cold_and_switch(detector, repeats: int) -> dict:
    """Load each backbone into a fresh model service (cold: the shared parts too), and switch between them."""
    from idanimator.service import ModelService
    from idanimator.testing import tiny_load_options

    options = tiny_load_options(device="cpu")
    cold = {"tiny": [], "tiny-single-file": []}
    switch = {"tiny": [], "tiny-single-file": []}
    for _ in range(repeats):
        for first, second in (("tiny", "tiny-single-file"), ("tiny-single-file", "tiny")):
            service = ModelService(options, detector=detector)
            cold[first].append(timed(lambda s=service, b=first: s.pipeline(b))[0])
            switch[second].append(timed(lambda s=service, b=second: s.pipeline(b))[0])
            del service
    cold_s = {name: median(times) for name, times in cold.items()}
    switch_s = {name: median(times) for name, times in switch.items()}
    return {
        "cold_load_s": cold_s,
        "switch_s": switch_s,
        "switch_vs_cold": sum(switch_s.values()) / sum(cold_s.values()),
    }


def face_path(ours, photo_crops, settings: dict, repeats: int) -> dict:
    """Our pipeline against diffusers' stock AnimateDiffPipeline on the same tiny weights, side by side."""
    import torch
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from idanimator.models import release_scheduler
    from idanimator.pipeline import FaceFeatureCache
    from idanimator.testing import build_tiny_kit, default_tiny_dir

    kit = build_tiny_kit(default_tiny_dir())
    stock = AnimateDiffPipeline.from_pretrained(
        kit["base"], motion_adapter=MotionAdapter.from_pretrained(kit["motion_adapter"]), torch_dtype=torch.float32
    )
    stock.scheduler = release_scheduler()
    stock.set_progress_bar_config(disable=True)
    ours.pipe.set_progress_bar_config(disable=True)
    common = dict(num_frames=settings["num_frames"], height=settings["height"], width=settings["width"])

    def run_ours():
        ours.face_cache = FaceFeatureCache()  # the image encoder runs, as for a new face
        ours(photo_crops, PROMPT, "", add_prompt_suffix=False, steps=settings["steps"], seed=0, **common)

    def run_stock():
        stock(
            prompt=PROMPT,
            negative_prompt="",
            num_inference_steps=settings["steps"],
            guidance_scale=8.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **common,
        )

    run_ours(), run_stock()  # first calls pay one-off costs on both sides
    ours_s, stock_s = [], []
    for _ in range(repeats):
        ours_s.append(timed(run_ours)[0])
        stock_s.append(timed(run_stock)[0])
    return {"ours_s": median(ours_s), "stock_s": median(stock_s), "face_path_ratio": median(ours_s) / median(stock_s)}


# -- the app in a subprocess, against the library in this process -------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(folder: Path, timeout: float = 180):
    """``app.py --tiny`` on a free port, as a user starts it; yields (url, process)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "app.py"), "--tiny", "--port", str(port), "--output-dir", str(folder / "app")]
    with open(folder / "app.log", "w") as app_log:
        process = subprocess.Popen(command, stdout=app_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the app exited: {(folder / 'app.log').read_text()[-2000:]}")
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the app did not start") from None
                    time.sleep(0.25)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def peak_rss_mb(pid: int) -> float:
    """A live process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def serving_overhead(photo: Path, folder: Path, request: dict, repeats: int) -> dict:
    """The same request through the app over HTTP and as a bare library call, alternating."""
    from gradio_client import Client, handle_file

    from idanimator.pipeline import IDAnimatorPipeline
    from idanimator.video import write_mp4

    library = IDAnimatorPipeline.from_pretrained("tiny", tiny=True, device="cpu")
    library.pipe.set_progress_bar_config(disable=True)
    resolution = "64x64 (tiny)" if (request["height"], request["width"]) == (64, 64) else "64x96 (tiny)"
    with running_app(folder) as (url, process):
        client = Client(url, verbose=False, download_files=str(folder / "client"))

        def over_http(seed: int):
            settings = request["num_frames"], request["steps"], 8.0, request["fps"], resolution
            video, _preview, result, _seed_text, seed_used, *_ = client.predict(
                [handle_file(str(photo))], PROMPT, "", True, "tiny", "", seed, False, 0.8, *settings,
                api_name="/generate",
            )  # fmt: skip
            assert result and Path(result).is_file() and seed_used == seed

        def in_library(seed: int):
            out = library(
                [str(photo)],
                PROMPT,
                "",
                seed=seed,
                num_frames=request["num_frames"],
                steps=request["steps"],
                height=request["height"],
                width=request["width"],
            )
            write_mp4(out.frames, folder / f"library-{seed}.mp4", fps=request["fps"])

        over_http(0), in_library(0)  # the app's warm-up, the detector, first calls
        http_s, library_s = [], []
        for i in range(repeats):
            http_s.append(timed(lambda i=i: over_http(i + 1))[0])
            library_s.append(timed(lambda i=i: in_library(i + 1))[0])
        serving_peak = peak_rss_mb(process.pid)
    return {
        "http_request_s": median(http_s),
        "library_call_s": median(library_s),
        "serving_overhead_ratio": median(http_s) / median(library_s),
        "serving_overhead_s": median(http_s) - median(library_s),
        "serving_peak_rss_mb": serving_peak,
    }


# -- the run -------------------------------------------------------------------------------------


def run(quick: bool, repeats: int | None) -> dict:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    repeats = repeats or (1 if quick else 5)
    # Requests: the app's tiny-mode starting values (8 frames, 4 steps, 64x64) for cold/warm; longer ones where
    # a ratio compares whole requests, so fixed costs of a few milliseconds do not decide it.
    request = {"num_frames": 8, "steps": 4, "height": 64, "width": 64, "fps": 8}
    long_request = {**request, "num_frames": 16, "steps": 8 if quick else 25}
    import torch

    from idanimator.testing import build_tiny_kit, default_tiny_dir

    build_tiny_kit(default_tiny_dir())
    with tempfile.TemporaryDirectory(prefix="idanimator-cpu-bench-") as tmp:
        folder = Path(tmp)
        photo = face_photo(folder)
        log("cold and warm requests ...")
        requests = cold_and_warm(photo, folder / "studio", request, repeats)
        studio = requests.pop("studio")
        log("cold loads and backbone switches ...")
        loads = cold_and_switch(studio.service.detector(), max(repeats, 2) if not quick else 1)
        log("our pipeline against diffusers' stock AnimateDiffPipeline ...")
        ours = studio.service.pipeline("tiny")
        crops, _ = studio.prepare_faces([str(photo)])
        faces = face_path(ours, crops, long_request, repeats)
        del studio, ours
        log("a request through the app against the library call ...")
        serving = serving_overhead(photo, folder, long_request, repeats)
    figures = {
        "face_path_ratio": faces["face_path_ratio"],
        "serving_overhead_ratio": serving["serving_overhead_ratio"],
        "warm_speedup": requests["cold_request_s"] / requests["warm_request_s"],
        "switch_vs_cold": loads["switch_vs_cold"],
        "peak_rss_mb": serving["serving_peak_rss_mb"],
    }
    return {
        **figures,
        "targets_met": {key: (figures[key] <= bound if op == "<=" else figures[key] >= bound) for key, (op, bound) in TARGETS.items()},
        "seconds": {
            **{k: v for k, v in requests.items()},
            "cold_load_s": loads["cold_load_s"],
            "switch_s": loads["switch_s"],
            "face_path_ours_s": faces["ours_s"],
            "face_path_stock_s": faces["stock_s"],
            "http_request_s": serving["http_request_s"],
            "library_call_s": serving["library_call_s"],
            "serving_overhead_s": serving["serving_overhead_s"],
        },
        "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "settings": {"request": request, "long_request": long_request, "repeats": repeats, "quick": quick},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/cpu.py", *sys.argv[1:]]),
    }


def table(results: dict) -> str:
    s = results["seconds"]
    rows = [
        ("face_path_ratio", f"{results['face_path_ratio']:.2f}", f"ours {s['face_path_ours_s']:.2f} s / stock {s['face_path_stock_s']:.2f} s"),
        ("serving_overhead_ratio", f"{results['serving_overhead_ratio']:.3f}", f"app {s['http_request_s']:.2f} s / library {s['library_call_s']:.2f} s"),
        ("warm_speedup", f"{results['warm_speedup']:.1f}", f"cold {s['cold_request_s']:.2f} s / warm {s['warm_request_s']:.2f} s"),
        ("switch_vs_cold", f"{results['switch_vs_cold']:.2f}", "switch " + ", ".join(f"{k} {v:.2f} s" for k, v in s["switch_s"].items()) + " / cold " + ", ".join(f"{k} {v:.2f} s" for k, v in s["cold_load_s"].items())),
        ("peak_rss_mb", f"{results['peak_rss_mb']:.0f}", f"the app server; this process {results['bench_peak_rss_mb']:.0f} MiB"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"{'figure':<{width}}  {'value':>8}  measured", "-" * (width + 60)]
    for key, value, detail in rows:
        target = TARGETS.get(key)
        mark = "" if target is None else f"  (target {target[0]} {target[1]}: {'met' if results['targets_met'][key] else 'MISSED'})"
        lines.append(f"{key:<{width}}  {value:>8}  {detail}{mark}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, shorter requests (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 5, 1 with --quick)")
    args = parser.parse_args()
    results = run(args.quick, args.repeats)
    print(json.dumps(results, indent=2) if args.json else table(results), flush=True)


if __name__ == "__main__":
    main()
