"""CPU benchmark: deploy_ctc's CPU backends against ``torch.nn.functional.ctc_loss`` (forward + backward).

``ctc_loss_and_grad`` as a user calls it (the native engine where it builds, see :mod:`deploy_ctc._backends.cpu`),
the pure-NumPy backend, and torch run in the same process on the same float32 inputs, interleaved, after a warm-up;
the report gives medians and their ratios to torch. Peak memory is measured in a fresh child process per
(implementation, shape): the growth of the peak resident set (VmHWM, reset once the inputs exist) over the resident
size at that point. Results go to JSON with a description of the machine. ``--logit-scale 10`` times confident
outputs that disagree with the targets instead (the engine's log-space path).

Run from a source checkout: ``python benchmarks/bench_cpu.py`` (writes ``benchmarks/results/bench_cpu.json``),
``python -m benchmarks.bench_cpu --help``, or ``deploy-ctc bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout's root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_medians, make_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_cpu.json"

# (T, N, C, S): the torch documentation example, a long-target batch, a large vocabulary, a long utterance.
SHAPES = [(50, 16, 20, 30), (500, 32, 30, 100), (400, 16, 1000, 80), (1500, 8, 5000, 300)]


#: The timed implementations: torch, deploy_ctc's default CPU backend, deploy_ctc's pure-NumPy backend.
IMPLEMENTATIONS = ("torch", "deploy_ctc", "numpy_backend")


def _runners(inputs):
    """``{name: f}`` for each of :data:`IMPLEMENTATIONS`: each runs one forward + backward on ``inputs``."""
    import torch

    from deploy_ctc import backends, ctc_loss_and_grad

    log_probs, targets, input_lengths, target_lengths = inputs
    t_lp = torch.from_numpy(log_probs)
    t_args = (torch.from_numpy(targets), torch.from_numpy(input_lengths), torch.from_numpy(target_lengths))

    def run_torch():
        x = t_lp.detach().requires_grad_()
        torch.nn.functional.ctc_loss(x, *t_args).backward()
        return x.grad

    def run_deploy_ctc():
        return ctc_loss_and_grad(log_probs, targets, input_lengths, target_lengths)[1]

    def run_numpy_backend():
        with backends.using("numpy"):
            return ctc_loss_and_grad(log_probs, targets, input_lengths, target_lengths)[1]

    return {"torch": run_torch, "deploy_ctc": run_deploy_ctc, "numpy_backend": run_numpy_backend}


def time_shape(shape, repeats, progress=None, logit_scale=1.0):
    """Median seconds of each implementation on ``shape``, interleaved runs after one warm-up each."""
    return interleaved_medians(_runners(make_inputs(*shape, logit_scale=logit_scale)), repeats, progress)


def peak_memory(name, shape, logit_scale=1.0):
    """Peak resident-set growth (bytes) of one forward + backward of ``name`` on ``shape``, in a child process."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from benchmarks.bench_cpu import _child_peak_memory; "
            f"print(json.dumps(_child_peak_memory({name!r}, {tuple(shape)!r}, {float(logit_scale)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_peak_memory(name, shape, logit_scale):
    runners = _runners(make_inputs(*shape, logit_scale=logit_scale))
    # Reset the peak-RSS mark (Linux: "5" to clear_refs) so the inputs' construction does not count.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    resident = _status_kib("VmRSS")
    runners[name]()
    return max(0, _status_kib("VmHWM") - resident) * 1024


def _status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def machine_description():
    """CPU model, core count and library versions, for the report."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def run(shapes=SHAPES, repeats=7, memory=True, stream=sys.stderr, logit_scale=1.0):
    """Time (and measure memory of) every shape; progress goes to ``stream``. Returns the result dict."""
    results = []
    for index, shape in enumerate(shapes, 1):
        label = f"[{index}/{len(shapes)}] (T,N,C,S)={shape}"

        def progress(done, total, label=label):
            stream.write(f"\r{label} timing {done}/{total}")
            stream.flush()

        medians = time_shape(shape, repeats, progress, logit_scale)
        row = {"shape": list(shape)}
        for name in IMPLEMENTATIONS:
            row[f"{name}_ms"] = medians[name] * 1e3
        row["speedup"] = medians["torch"] / medians["deploy_ctc"]
        row["numpy_backend_speedup"] = medians["torch"] / medians["numpy_backend"]
        if memory:
            stream.write(f"\r{label} peak memory          ")
            stream.flush()
            for name in IMPLEMENTATIONS:
                row[f"{name}_peak_mb"] = peak_memory(name, shape, logit_scale) / 2**20
        stream.write(f"\r{label} done: {row['speedup']:.2f}x            \n")
        results.append(row)
    from deploy_ctc import backends

    speedups = [row["speedup"] for row in results]
    numpy_speedups = [row["numpy_backend_speedup"] for row in results]
    return {"benchmark": "CTC loss forward+backward, float32, CPU", "machine": machine_description(),
            "deploy_ctc_backend": backends.cpu_backend(), "logit_scale": logit_scale, "repeats": repeats,
            "rows": results,
            "geomean_speedup": _geomean(speedups), "min_speedup": min(speedups),
            "numpy_backend_geomean_speedup": _geomean(numpy_speedups),
            "numpy_backend_min_speedup": min(numpy_speedups)}


def _geomean(values):
    return float(np.exp(np.mean(np.log(values))))


def format_table(report):
    """A Markdown table of ``report`` (as returned by :func:`run`)."""
    memory = "torch_peak_mb" in report["rows"][0]
    backend = report["deploy_ctc_backend"]
    head = f"| (T, N, C, S) | torch (ms) | deploy_ctc, {backend} (ms) | speed-up | NumPy backend (ms) | speed-up |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if memory:
        head += " peak MB torch | peak MB deploy_ctc | peak MB NumPy backend |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for row in report["rows"]:
        line = (f"| {tuple(row['shape'])} | {row['torch_ms']:.1f} | {row['deploy_ctc_ms']:.1f} | "
                f"{row['speedup']:.2f}x | {row['numpy_backend_ms']:.1f} | {row['numpy_backend_speedup']:.2f}x |")
        if memory:
            line += " " + " | ".join(f"{row[f'{name}_peak_mb']:.0f}" for name in IMPLEMENTATIONS) + " |"
        lines.append(line)
    m = report["machine"]
    lines.append("")
    lines.append(f"Geometric-mean speed-up {report['geomean_speedup']:.2f}x (lowest {report['min_speedup']:.2f}x) "
                 f"for deploy_ctc ({backend} backend), {report['numpy_backend_geomean_speedup']:.2f}x (lowest "
                 f"{report['numpy_backend_min_speedup']:.2f}x) for the pure-NumPy backend; medians of "
                 f"{report['repeats']} interleaved runs; logits x{report['logit_scale']:g}; {m['cpu']}, "
                 f"{m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), numpy {m['numpy']}.")
    return "\n".join(lines)


def main(argv=None, prog="bench_cpu.py"):
    """Run the CPU benchmark, print the table, write JSON; returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation and shape")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file for the results (default: print only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--quick", action="store_true", help="only the two smallest shapes, 3 repeats")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="multiply the random logits (10: confident outputs that disagree with the targets)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("the CPU benchmark compares against torch: pip install 'deploy_ctc[test]'", file=sys.stderr)
        return 2
    shapes, repeats = (SHAPES[:2], 3) if args.quick else (SHAPES, args.repeats)
    report = run(shapes, repeats, memory=not args.no_memory, logit_scale=args.logit_scale)
    print(format_table(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["--output", str(RESULTS)]))
