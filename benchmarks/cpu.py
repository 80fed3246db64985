"""CPU benchmark on the tiny kit: every figure is a ratio of two things measured side by side in one run.

    python benchmarks/cpu.py [--quick | --smoke] [--json] [--repeats N] [--threads N]

* ``warm_speedup``: a server's first request (in a fresh process, after its imports: it loads the face
  detector, the shared parts and the backbone) / a later, warm request.  Target: >= 5.
* ``switch_vs_cold``: a backbone switch in that server (the shared parts stay) / the cold load inside its
  first request, for the same backbone; the kit has two, "tiny" (a diffusers folder) and "tiny-single-file"
  (the same weights as one original-layout file), and fresh processes alternate between them. Also
  reported: ``switch_vs_reload``, the switch against loading everything again in the now-warm process.
  Target: <= 0.5.
* ``face_path_ratio``: our pipeline (aligned face crop -> CLIP image encoder -> resampler -> face attention;
  per-frame motion norms) / diffusers' stock ``AnimateDiffPipeline`` on the same weights and settings, both
  from prompt to decoded frames: what the face adapter path costs.
* ``serving_overhead_ratio``: a request through the running app (``app.py --tiny`` in a subprocess, called
  with gradio_client: upload, queue, progress with previews, streamed segments, the MP4, its download) /
  the bare library call in this process (``IDAnimatorPipeline`` on the same photo, then ``write_mp4``),
  same settings.  Target: <= 1.10. The app streams 8-frame segments while it decodes when ffmpeg and
  ffprobe are on the PATH; ``serving_overhead_ratio_without_streaming`` is a second app with them hidden.
* ``peak_rss_mb``: the app server's peak resident memory after its requests (this process's own is
  ``bench_peak_rss_mb``).
* ``options``: what each option beyond the release costs (``benchmarks/options.py``): the fast mode's speed-up,
  FreeInit, a style LoRA, SparseCtrl and ControlNet, a long video per frame.

Both sides of a ratio alternate and the medians are compared; the load average is recorded with the
figures. On a machine shared with other work, torch's default of one thread per core stalls whenever a
core is taken away (a denoising step then takes up to ten times as long): ``--threads 1`` (every process
of the run, the app's too) keeps the figures steady there. ``--quick``: fewer repeats and fresh processes.
``--smoke``: the smallest requests and one repeat, for the test suite (figures mean little). ``--json``:
one JSON object on stdout and nothing else (progress goes to stderr). Writes only temporary files, removed
at exit; the tiny kit is built once, where ``--tiny`` keeps it (``$IDANIMATOR_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import PROMPT, face_photo, median, timed  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"serving_overhead_ratio": ("<=", 1.10), "warm_speedup": (">=", 5.0), "switch_vs_cold": ("<=", 0.5)}
FIGURES = ["face_path_ratio", "serving_overhead_ratio", "warm_speedup", "switch_vs_cold", "peak_rss_mb"]
BACKBONES = ["tiny", "tiny-single-file"]  # the tiny kit's: a diffusers folder, and the same weights as one file
FPS = 8
TOOLS = ("ffmpeg", "ffprobe")  # on the PATH, the app streams the video while it is decoded


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plan(mode: str) -> dict:
    """Requests and repeats. The cold/warm request is the app's tiny-mode start (8 frames, 4 steps, 64x64);
    where a ratio compares whole requests, a longer one, so that a few milliseconds do not decide it."""
    request = {"num_frames": 8, "num_inference_steps": 4, "height": 64, "width": 64}
    if mode == "smoke":
        request = {**request, "num_frames": 2, "num_inference_steps": 1}
        return {"request": request, "long_request": request, "repeats": 1, "processes": 1}
    long_request = {**request, "num_frames": 16, "num_inference_steps": 25}
    if mode == "quick":
        return {"request": request, "long_request": long_request, "repeats": 2, "processes": 2}
    return {"request": request, "long_request": long_request, "repeats": 5, "processes": 4}


# -- a freshly started server: cold and warm requests, switches ------------------------------------


def fresh_process(first: str, photo: Path, output_dir: Path, request: dict, repeats: int) -> dict:
    """What a freshly started server pays, run first thing in a process (after its imports only).

    The first request loads the face detector, the shared parts and backbone ``first``; later requests are
    warm. Then a switch to the other backbone and back: the switch back into ``first`` is compared with the
    cold load of ``first`` (the model loading inside the first request), and with a reload into a fresh
    model service in this now-warm process (``reload_s``).
    """
    from idanimator.request import GenerationRequest
    from idanimator.service import ModelService
    from idanimator.studio import Finished, Studio, StudioOptions

    second = next(name for name in BACKBONES if name != first)
    studio = Studio(StudioOptions(tiny=True, device="cpu", output_dir=output_dir))
    service_pipeline, loads = studio.service.pipeline, []

    def timed_pipeline(backbone=None):  # the model loading inside a request
        seconds, pipeline = timed(lambda: service_pipeline(backbone))
        loads.append(seconds)
        return pipeline

    studio.service.pipeline = timed_pipeline

    def run() -> None:
        events = list(
            studio.run([str(photo)], GenerationRequest(prompt=PROMPT, backbone=first, seed=1, fps=FPS, **request))
        )
        assert isinstance(events[-1], Finished)

    cold_request, _ = timed(run)
    cold_load = loads[0]
    warm = median([timed(run)[0] for _ in range(repeats)])
    # [0]: nothing here may hold the pipeline a switch drops (the service would have to collect it)
    switch_out = timed(lambda: studio.service.pipeline(second))[0]
    switch = timed(lambda: studio.service.pipeline(first))[0]
    fresh_service = ModelService(studio.service.options, detector=studio.service.detector())
    reload = timed(lambda: fresh_service.pipeline(first))[0]
    return {
        "backbone": first,
        "cold_request_s": cold_request,
        "warm_request_s": warm,
        "cold_load_s": cold_load,
        "switch_s": switch,
        "switch_out_s": switch_out,
        "reload_s": reload,
    }


def more_fresh_processes(first: dict, count: int, mode: str) -> list[dict]:
    """``first`` (this process's figures) and ``count - 1`` more from new processes, alternating backbones."""
    results = [first]
    for i in range(1, count):
        backbone = BACKBONES[(BACKBONES.index(first["backbone"]) + i) % len(BACKBONES)]
        command = [sys.executable, __file__, "--fresh-process", backbone, *([f"--{mode}"] if mode != "full" else [])]
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        results.append(json.loads(out.stdout))
    return results


# -- our pipeline against diffusers' stock AnimateDiffPipeline -----------------------------------


def face_path(photo: Path, settings: dict, repeats: int, warm_up: bool) -> dict:
    """Ours and diffusers' stock AnimateDiffPipeline on the same tiny weights and settings, alternating."""
    import torch
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from idanimator.models import release_scheduler
    from idanimator.pipeline import FaceFeatureCache, IDAnimatorPipeline
    from idanimator.tiny import build_tiny_kit, default_tiny_dir

    kit = build_tiny_kit(default_tiny_dir())
    ours = IDAnimatorPipeline.from_pretrained("tiny", tiny=True, device="cpu")
    crops = ours.prepare_faces([str(photo)])  # face detection is not part of either side
    stock = AnimateDiffPipeline.from_pretrained(
        kit["base"], motion_adapter=MotionAdapter.from_pretrained(kit["motion_adapter"]), torch_dtype=torch.float32
    )
    stock.scheduler = release_scheduler()
    for pipe in (ours.pipe, stock):
        pipe.set_progress_bar_config(disable=True)
    size = dict(num_frames=settings["num_frames"], height=settings["height"], width=settings["width"])

    def run_ours():
        ours.face_cache = FaceFeatureCache()  # the image encoder runs, as for a new face
        ours(
            crops,
            PROMPT,
            negative_prompt="",
            add_prompt_suffix=False,
            num_inference_steps=settings["num_inference_steps"],
            seed=0,
            **size,
        )

    def run_stock():
        generator = torch.Generator().manual_seed(0)
        stock(
            PROMPT, negative_prompt="", num_inference_steps=settings["num_inference_steps"], generator=generator, **size
        )

    if warm_up:  # first calls pay one-off costs on both sides
        run_ours(), run_stock()
    ours_s, stock_s = [], []
    for _ in range(repeats):
        ours_s.append(timed(run_ours)[0])
        stock_s.append(timed(run_stock)[0])
    return {"ours_s": median(ours_s), "stock_s": median(stock_s)}


# -- the app in a subprocess, against the library in this process -------------------------------


class App:
    """``app.py --tiny`` on a free port in a subprocess, as a user starts it. ``streaming=False`` hides ffmpeg and
    ffprobe from it (as on a server without them), which turns its streamed segments off."""

    def __init__(self, folder: Path, streaming: bool = True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        self.log = folder / f"app-{port}.log"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        if not streaming:
            paths = env.get("PATH", "").split(os.pathsep)
            env["PATH"] = os.pathsep.join(p for p in paths if not any((Path(p) / t).exists() for t in TOOLS))
        command = [sys.executable, "app.py", "--tiny", "--port", str(port), "--output-dir", str(folder / f"app-{port}")]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=_die_with_parent
            )

    def wait_until_up(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the app did not start") from None
                time.sleep(0.25)

    def peak_rss_mb(self) -> float:
        """The server's peak resident set so far (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _die_with_parent() -> None:
    """In the app's process: end it when this script ends, however it ends (Linux's PR_SET_PDEATHSIG), so a
    killed benchmark never leaves a server behind."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def serving_overhead(apps: dict[str, App], photo: Path, folder: Path, request: dict, repeats: int, warm_up: bool):
    """The same request through each app over HTTP and as a bare library call, alternating."""
    from gradio_client import Client, handle_file

    from idanimator.pipeline import IDAnimatorPipeline
    from idanimator.video import write_mp4

    library = IDAnimatorPipeline.from_pretrained("tiny", tiny=True, device="cpu")
    resolution = {(64, 64): "64x64 (tiny)", (96, 64): "64x96 (tiny)"}[request["height"], request["width"]]
    clients = {}
    for name, app in apps.items():
        app.wait_until_up()
        clients[name] = Client(app.url, verbose=False, download_files=str(folder / f"client-{name}"))

    def over_http(client, seed: int) -> None:
        outputs = client.predict(  # by parameter name, as the README shows API clients
            faces=[handle_file(str(photo))],
            prompt=PROMPT,
            negative_prompt="",
            backbone="tiny",
            seed=seed,
            randomize_seed=False,
            num_frames=request["num_frames"],
            num_inference_steps=request["num_inference_steps"],
            fps=FPS,
            resolution=resolution,
            api_name="/generate",
        )
        video, seed_used = outputs[2], outputs[4]
        assert Path(video).is_file() and seed_used == seed, outputs

    def in_library(seed: int) -> None:
        size = dict(num_frames=request["num_frames"], height=request["height"], width=request["width"])
        result = library(
            [str(photo)],
            PROMPT,
            negative_prompt="",
            num_inference_steps=request["num_inference_steps"],
            seed=seed,
            output_type="np",
            **size,
        )
        write_mp4(result.frames[0], folder / f"library-{seed}.mp4", fps=FPS)

    # The first request to an app also waits for its warm-up; the first library call loads the detector.
    for _ in range(2 if warm_up else 1):
        for client in clients.values():
            over_http(client, 0)
        in_library(0)
    http_s: dict[str, list[float]] = {name: [] for name in clients}
    library_s = []
    for i in range(repeats):
        for name, client in clients.items():
            http_s[name].append(timed(lambda c=client, i=i: over_http(c, i + 1))[0])
        library_s.append(timed(lambda i=i: in_library(i + 1))[0])
    return {
        "http_request_s": {name: median(times) for name, times in http_s.items()},
        "library_call_s": median(library_s),
        "app_peak_rss_mb": apps["app"].peak_rss_mb(),
    }


# -- the run -------------------------------------------------------------------------------------


def run(mode: str, repeats: int | None) -> dict:
    import torch

    setup = plan(mode)
    repeats = repeats or setup["repeats"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="idanimator-cpu-bench-") as tmp:
        folder = Path(tmp)
        photo = face_photo(folder)
        streams = all(shutil.which(tool) for tool in TOOLS)
        apps: dict[str, App] = {}
        if mode == "smoke":  # let the server start while the rest runs
            apps["app"] = App(folder)
        try:
            log("a fresh process: first request, warm requests, backbone switches ...")
            own = fresh_process(BACKBONES[0], photo, folder / "studio", setup["request"], repeats)
            processes = more_fresh_processes(own, setup["processes"], mode)
            log("our pipeline against diffusers' stock AnimateDiffPipeline ...")
            faces = face_path(photo, setup["long_request"], repeats, warm_up=mode != "smoke")
            log("a request through the app against the library call ...")
            if "app" not in apps:  # (not setdefault: it would start a second server and leave it running)
                apps["app"] = App(folder)
            if streams and mode != "smoke":  # the same app without its streamed segments, for comparison
                apps["app_without_streaming"] = App(folder, streaming=False)
            serving = serving_overhead(apps, photo, folder, setup["long_request"], repeats, warm_up=mode != "smoke")
            log("what each option beyond the release costs ...")
            from options import option_costs  # benchmarks/options.py

            options = option_costs(photo, folder, setup["long_request"], repeats)
        finally:
            for app in apps.values():
                app.stop()

    def each(key: str) -> float:
        return median([p[key] for p in processes])

    figures = {
        "face_path_ratio": faces["ours_s"] / faces["stock_s"],
        "serving_overhead_ratio": serving["http_request_s"]["app"] / serving["library_call_s"],
        "warm_speedup": median([p["cold_request_s"] / p["warm_request_s"] for p in processes]),
        "switch_vs_cold": median([p["switch_s"] / p["cold_load_s"] for p in processes]),
        "peak_rss_mb": serving["app_peak_rss_mb"],
    }
    return {
        **figures,
        "targets_met": {k: figures[k] <= v if op == "<=" else figures[k] >= v for k, (op, v) in TARGETS.items()},
        "switch_vs_reload": median([p["switch_s"] / p["reload_s"] for p in processes]),
        "serving_overhead_ratio_without_streaming": (
            serving["http_request_s"]["app_without_streaming"] / serving["library_call_s"]
            if "app_without_streaming" in serving["http_request_s"]
            else None
        ),
        "app_streams": streams,
        "seconds": {
            **{key: each(key) for key in ("cold_request_s", "warm_request_s", "cold_load_s", "switch_s", "reload_s")},
            "face_path_ours_s": faces["ours_s"],
            "face_path_stock_s": faces["stock_s"],
            "http_request_s": serving["http_request_s"]["app"],
            "http_request_without_streaming_s": serving["http_request_s"].get("app_without_streaming"),
            "library_call_s": serving["library_call_s"],
            "serving_overhead_s": serving["http_request_s"]["app"] - serving["library_call_s"],
        },
        "options": options,
        "fresh_processes": processes,
        "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "settings": {**setup, "repeats": repeats, "mode": mode, "fps": FPS},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # at the start and the end
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", "benchmarks/cpu.py", *sys.argv[1:]]),
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def table(results: dict) -> str:
    s, f = results["seconds"], results
    rows = [
        ("face_path_ratio", f"{f['face_path_ratio']:.2f}",
         f"ours {s['face_path_ours_s']:.2f} s / stock AnimateDiffPipeline {s['face_path_stock_s']:.2f} s"),
        ("serving_overhead_ratio", f"{f['serving_overhead_ratio']:.3f}",
         f"app over HTTP {s['http_request_s']:.2f} s ({'with' if f['app_streams'] else 'no'} streamed segments) / "
         f"library call {s['library_call_s']:.2f} s"),
        ("warm_speedup", f"{f['warm_speedup']:.1f}",
         f"first request {s['cold_request_s']:.2f} s / warm request {s['warm_request_s']:.2f} s"),
        ("switch_vs_cold", f"{f['switch_vs_cold']:.2f}",
         f"switch {s['switch_s']:.2f} s / cold load {s['cold_load_s']:.2f} s (a reload: {s['reload_s']:.2f} s)"),
        ("peak_rss_mb", f"{f['peak_rss_mb']:.0f}", f"the app server (this process: {f['bench_peak_rss_mb']:.0f})"),
    ]  # fmt: skip
    lines = [f"{'figure':<22}  {'value':>7}  measured side by side (medians)", "-" * 100]
    for key, value, detail in rows:
        target = TARGETS.get(key)
        if target is not None:
            detail += f"  [target {target[0]} {target[1]}: {'met' if f['targets_met'][key] else 'MISSED'}]"
        lines.append(f"{key:<22}  {value:>7}  {detail}")
    if f["serving_overhead_ratio_without_streaming"] is not None:
        plain = f"{f['serving_overhead_ratio_without_streaming']:.3f}"
        seconds = s["http_request_without_streaming_s"]
        lines.append(f"{'  without streaming':<22}  {plain:>7}  app over HTTP {seconds:.2f} s (ffmpeg hidden from it: "
                     "no segments) / the same library calls")  # fmt: skip
    from options import table as options_table

    lines += ["", "options beyond the release (each / the plain request, unless a speed-up):"]
    lines += [options_table(f["options"])]
    setup, machine = f["settings"], f["machine"]
    lines += [
        "",
        f"first/warm/switch request {setup['request']}; face path and serving {setup['long_request']}",
        f"{setup['repeats']} repeats, {len(f['fresh_processes'])} fresh processes; {machine['cpus']} CPUs, "
        f"load average {machine['load_average'][0]} -> {machine['load_average'][1]}; {f['date']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="fewer repeats and fresh processes")
    modes.add_argument("--smoke", action="store_true", help="smallest requests, one repeat (the test suite's run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 5; quick 2; smoke 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of every process (default: torch's, one per core)"
    )
    parser.add_argument("--fresh-process", choices=BACKBONES, help=argparse.SUPPRESS)  # one more fresh process
    args = parser.parse_args()
    if args.threads:  # before torch starts its thread pool, here and in every process started from here
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    from idanimator.tiny import build_tiny_kit, default_tiny_dir

    build_tiny_kit(default_tiny_dir())  # once, before any timing (tiny mode builds it on first use)
    if args.fresh_process:
        setup = plan(mode)
        with tempfile.TemporaryDirectory(prefix="idanimator-cpu-bench-") as tmp:
            photo = face_photo(Path(tmp))
            figures = fresh_process(args.fresh_process, photo, Path(tmp), setup["request"], setup["repeats"])
        print(json.dumps(figures))
        return
    results = run(mode, args.repeats)
    print(json.dumps(results, indent=2) if args.json else table(results), flush=True)


if __name__ == "__main__":
    main()
