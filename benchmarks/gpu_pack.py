"""Every GPU row of ``docs/benchmarks.md`` in one run: the GPU benchmark pack.

Made for a GPU machine lent for a few minutes, with PyTorch but without Ray, MLflow or network
(``benchmarks/gpu_pack.sh`` installs the offline Ray bundle first and then runs this). Each
section runs as its own process with a time limit, so one slow or failing section costs only its
own row; the pack ends within ``--budget-s`` (default 480 s on one H100). Sections:

1. ``engine_vit`` / ``engine_resnet``: the counting engine against Cohen et al.'s ``Smooth`` loop and
   a plain bf16 loop with on-device counting, measured in the same process, at n = 100,000
   (the fp32 loops on ``--ref-n`` samples per image, scaled: the cost is linear in n): ViT-B/16 at
   224 px (timm's ``vit_base_patch16_224``) and the CIFAR ResNet-110, fp32 and bf16 (ResNet with
   channels_last);
2. ``ray_certify``: ``rayrcm certify`` with one GPU actor against the engine alone (Ray Data overhead);
3. ``train_overhead``: Ray Train step throughput against the same loop in one process;
4. ``denoised``: certification through a diffusion denoiser of the authors' CIFAR scale (a UNet
   with 128 channels, multipliers 1,2,2,2) in front of the classifier;
5. ``sampling``: fixed, input-specific and sequential sampling on a CIFAR ResNet-20 trained on the
   GPU here: draws and wall time.

Writes one JSON file (``--out``, default ``gpu_pack.json``) with the device, torch/CUDA versions,
the date and every section's summary, and prints the Markdown rows for ``docs/benchmarks.md``.
``--smoke`` runs the same sections on the CPU with tiny sizes (the test suite does, so a broken
pack fails CI).

The sections that use Ray (``RAY_SECTIONS``) share one local Ray cluster: the pack starts it (every
CPU, at least 4, and the GPUs of the machine; a ``RAY_ADDRESS`` already set is not used) before the
first of them, hands its address to each in ``RAY_ADDRESS`` and stops it at the end, so no section
times, or waits for, a cluster start of its own. Its auth mode is the sections' one:
``RAY_AUTH_MODE`` from the environment, ``disabled`` when unset (a token, when ``token``, under
``$HOME/.ray``).

    bash benchmarks/gpu_pack.sh                    # on the GPU machine (installs Ray from .whl/ if needed)
    python benchmarks/gpu_pack.py --smoke --out /tmp/pack.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAY_SECTIONS = {"ray_certify", "train_overhead", "sampling"}  # the sections that run on the pack's Ray cluster


def sections(smoke: bool, device: str) -> list[tuple[str, list[str], int]]:
    """``(name, argv after the python executable, time limit in seconds)`` of each section."""
    b = str(HERE)
    if smoke:  # tiny sizes on the CPU: every section's code path and every row
        return [
            ("engine_vit", [f"{b}/certify_engine.py", "--device", device, "--model", "vit_digits", "--image-size", "16",
                            "--n", "400", "--images", "2", "--batch", "200", "--precision", "bf16", "--plain-bf16",
                            "--skip-ray"], 120),
            ("ray_certify", [f"{b}/certify_engine.py", "--device", device, "--model", "vit_digits", "--image-size", "16",
                             "--n", "400", "--images", "2", "--batch", "200", "--workers", "1"], 180),
            ("train_overhead", [f"{b}/train_overhead.py", "--device", device, "--steps", "6", "--window", "3",
                                "--set", "data.image_size=16", "--set", "data.batch_size=16"], 180),
            # a UNet of 16 channels: clearly more work than the ResNet-8 (8 channels timed within noise of it on a busy CPU)
            ("denoised", [f"{b}/certify_denoised.py", "--device", device, "--encoder", "cifar_resnet8", "--image-size", "16",
                          "--unet-channels", "16", "--mults", "1,2", "--n", "200", "--images", "1", "--batch", "100",
                          "--skip-ray"], 120),
            # 2 images (of 360, every 180th); sequential stops at n at the latest, fixed draws n0 + n: fewer draws always
            ("sampling", [f"{b}/certify_sampling.py", "--cifar", "--train-steps", "4", "--sigma", "0.5", "--n", "400",
                          "--iss-n0", "100", "--radii", "0,0.25", "--skip", "180", "--workers", "1",
                          "--modes", "fixed,iss,sequential"], 300),  # tolerant: sequential's code with one more threshold
        ]
    gpu = ["--device", "cuda"]
    return [
        ("engine_vit", [f"{b}/certify_engine.py", *gpu, "--model", "vit_base_patch16_224", "--image-size", "224",
                        "--n", "100000", "--ref-n", "10000", "--images", "2", "--batch", "1000", "--precision", "bf16",
                        "--plain-bf16", "--skip-ray"], 120),
        ("engine_resnet", [f"{b}/certify_engine.py", *gpu, "--model", "cifar_resnet110", "--image-size", "32",
                           "--n", "100000", "--images", "3", "--batch", "10000", "--precision", "bf16", "--channels-last",
                           "--plain-bf16", "--skip-ray"], 90),
        ("ray_certify", [f"{b}/certify_engine.py", *gpu, "--model", "cifar_resnet110", "--image-size", "32",
                         "--n", "100000", "--ref-n", "20000", "--images", "6", "--batch", "10000", "--precision", "bf16",
                         "--channels-last", "--workers", "1", "--threads", "4"], 90),
        ("train_overhead", [f"{b}/train_overhead.py", *gpu, "--steps", "200", "--window", "100", "--precision", "bf16"], 60),
        ("denoised", [f"{b}/certify_denoised.py", *gpu, "--encoder", "cifar_resnet110", "--image-size", "32",
                      "--unet-channels", "128", "--mults", "1,2,2,2", "--n", "10000", "--images", "2", "--batch", "2000",
                      "--precision", "bf16", "--skip-ray"], 45),
        ("sampling", [f"{b}/certify_sampling.py", "--cifar", "--gpu", "--train-steps", "600", "--sigma", "0.5", "--n",
                      "100000", "--skip", "6", "--workers", "1", "--precision", "bf16"], 90),
    ]


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that is a JSON object (a section's summary); its ``summary`` if it has one."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            return obj.get("summary", obj) if isinstance(obj, dict) else None
    return None


def run_section(name: str, argv: list[str], limit: int, env: dict[str, str]) -> dict:
    tic = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=limit, env=env)
        out = {"rc": proc.returncode, "summary": last_json(proc.stdout)}
        if proc.returncode:
            out["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
    except subprocess.TimeoutExpired as err:
        out = {"rc": 124, "summary": last_json(err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")),
               "error": [f"over its {limit} s limit"]}
    out["seconds"] = round(time.perf_counter() - tic, 1)
    print(f"[gpu_pack] {name}: rc {out['rc']} in {out['seconds']} s" + (f" ({out['error'][0]})" if out.get("error") else ""),
          flush=True)
    return out


def start_ray(env: dict[str, str]) -> dict[str, str]:
    """Start the pack's local Ray cluster in this process, with the sections' environment (its
    workers inherit it: ``PYTHONPATH``, ``RAY_AUTH_MODE``); returns what the sections need to join it
    (its address, and no wait for GPUs: it never grows). It stops when
    this process ends, killed included (rayrcm's watchdog, :mod:`rayrcm.orchestration.reaper`)."""
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    import ray

    from rayrcm.orchestration.cluster import GPU_WAIT_ENV, ensure_ray

    ensure_ray(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, GPU_WAIT_ENV: "0"}


def _f(v: object, fmt: str = ".2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def markdown(pack: dict) -> str:
    """The rows of ``docs/benchmarks.md``'s GPU table, one per measured figure ('-': not measured)."""
    dev, s = pack["device"], pack["sections"]
    lines = [f"GPU pack: {dev}, torch {pack['torch']}, CUDA {pack['cuda']}, {pack['date']}", "",
             "| figure | reference | rayrcm | ratio / overhead |", "|---|---|---|---|"]
    for name, label in (("engine_vit", "ViT-B/16 224 px"), ("engine_resnet", "CIFAR ResNet-110")):
        m = (s.get(name) or {}).get("summary") or {}
        fast = next((v for k, v in m.items() if k.startswith("engine_b") and k.endswith("_s_per_image")), None)
        lines.append(f"| {label}, s/image at n = {m.get('n', '-')} | Cohen fp32 {_f(m.get('reference_fp32_s_per_image'))}; "
                     f"plain bf16 {_f(m.get('plain_bf16_s_per_image'))} | engine fp32 {_f(m.get('engine_fp32_s_per_image'))}; "
                     f"bf16 {_f(fast)} | {_f((m.get('reference_fp32_s_per_image') or 0) / fast if fast else None, '.1f')}x "
                     "vs Cohen |")
    ray = (s.get("ray_certify") or {}).get("summary") or {}
    steady = 100 * ray["ray_overhead_steady"] if "ray_overhead_steady" in ray else None
    lines.append(f"| rayrcm certify, 1 actor vs the engine alone | engine {_f(ray.get('engine_fp32_s_per_image'))} s/image "
                 f"(fp32) | job {_f((ray.get('ray_w1') or {}).get('wall_s'), '.1f')} s wall | steady {_f(steady, '.1f')} % |")
    tr = (s.get("train_overhead") or {}).get("summary") or {}
    lines.append(f"| Ray Train step throughput vs one process | {_f(tr.get('direct_images_per_s'), '.0f')} img/s | "
                 f"{_f(tr.get('ray_images_per_s'), '.0f')} img/s | {_f(tr.get('overhead_pct'), '.1f')} % |")
    dn = (s.get("denoised") or {}).get("summary") or {}
    per = dn.get("s_per_image_at_n_100k") or {}
    lines.append(f"| denoised smoothing, s/image at n = 100,000 | classifier {_f(per.get('classifier'), '.1f')} | "
                 f"denoised {_f(per.get('denoised'), '.1f')} | {_f(dn.get('engine_slowdown'), '.1f')}x slower |")
    sm = (s.get("sampling") or {}).get("summary") or {}
    for mode in ("iss", "sequential"):
        lines.append(f"| {mode} sampling vs fixed (draws, wall) | fixed {_f((sm.get('fixed') or {}).get('samples'), ',.0f')} | "
                     f"{_f((sm.get(mode) or {}).get('samples'), ',.0f')} | {_f(sm.get(f'samples_ratio_{mode}'), '.1f')}x, "
                     f"{_f(sm.get(f'wall_ratio_{mode}'), '.1f')}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    ap.add_argument("--out", default="gpu_pack.json")
    ap.add_argument("--only", default="", help="comma-separated section names (default: all)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections once this much time is spent")
    args = ap.parse_args()
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("[gpu_pack] no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # the Ray sections get the pack's cluster
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    pack = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "torch": torch.__version__,
            "cuda": torch.version.cuda or "-", "date": datetime.date.today().isoformat(), "smoke": args.smoke, "sections": {}}
    chosen = [n for n in args.only.split(",") if n]
    tic = time.perf_counter()
    ray_error = ""
    try:
        for name, argv, limit in sections(args.smoke, device):
            if chosen and name not in chosen:
                continue
            left = args.budget_s - (time.perf_counter() - tic)
            if left < 20:
                pack["sections"][name] = {"rc": None, "error": ["not started: the pack's time budget is spent"]}
                continue
            if name in RAY_SECTIONS and "RAY_ADDRESS" not in env and not ray_error:
                try:  # one cluster for every Ray section
                    started = time.perf_counter()
                    env = {**env, **start_ray(env)}
                    pack["ray_start_s"] = round(time.perf_counter() - started, 1)
                    print(f"[gpu_pack] Ray cluster at {env['RAY_ADDRESS']} in {pack['ray_start_s']} s, for "
                          f"{', '.join(sorted(RAY_SECTIONS))}", flush=True)
                except Exception as err:  # noqa: BLE001 (no Ray here: the Ray sections fail, the others still run)
                    ray_error = f"{type(err).__name__}: {err}".splitlines()[0]
                    print(f"[gpu_pack] no Ray cluster ({ray_error})", file=sys.stderr, flush=True)
            if name in RAY_SECTIONS and ray_error:
                pack["sections"][name] = {"rc": None, "error": [f"not started: no Ray cluster ({ray_error})"]}
            else:
                pack["sections"][name] = run_section(name, argv, int(min(limit, left)), env)
            Path(args.out).write_text(json.dumps(pack, indent=1))  # what is measured so far survives a killed pack
    finally:
        if "RAY_ADDRESS" in env:
            import ray

            ray.shutdown()
    print(markdown(pack), flush=True)
    failed = [n for n, r in pack["sections"].items() if r.get("rc") != 0]
    print(f"[gpu_pack] {len(pack['sections']) - len(failed)}/{len(pack['sections'])} sections in "
          f"{time.perf_counter() - tic:.0f} s; JSON in {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
