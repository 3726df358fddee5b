"""The PyTorch side of the benchmark: `benchmarks/torch_bench.py` run with another Python, torch and torchvision found first."""

import subprocess

from tfdogs.bench.steps import TORCH_SCRIPT, _last_json_line


def probe_torch(torch_python):
    """(versions, None) when torch and torchvision import in `torch_python`, else (None, reason)."""
    if not TORCH_SCRIPT.is_file():
        return None, f"{TORCH_SCRIPT} not found (run from a source checkout)"
    try:
        done = subprocess.run(
            [torch_python, "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"],
            capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{torch_python}: {error}"
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        return None, f"{torch_python}: {lines[-1] if lines else 'exit ' + str(done.returncode)}"
    torch_version, vision_version = done.stdout.split()
    return f"torch {torch_version}, torchvision {vision_version}", None


def run_torch(torch_python, job):
    """One PyTorch measurement (`benchmarks/torch_bench.py`) in its own process."""
    timing = job["timing"]
    command = [torch_python, str(TORCH_SCRIPT), "--part", job["part"], "--setting", job["setting"],
               "--image-size", str(job["image_size"]), "--batch-size", str(job["batch_size"]),
               "--num-classes", str(job["num_classes"]), "--warmup-steps", str(timing["warmup_steps"]),
               "--window-steps", str(timing["window_steps"]), "--windows", str(timing["windows"])]
    if job["part"] == "pipeline":
        command += ["--files", job["files"], "--workers", str(job["workers"]),
                    "--crop-scale-min", str(job["crop_scale_min"])]
    else:
        command += ["--model", job["model"]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"PyTorch benchmark failed ({done.returncode}): {' '.join(command)}\n"
                           f"{done.stderr[-3000:]}")
    return _last_json_line(done.stdout, command)


# ----------------------------------------------------------------------------- the table
