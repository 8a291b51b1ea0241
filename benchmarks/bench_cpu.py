"""CPU benchmark: deploy_ctc's CPU backends against ``torch.nn.functional.ctc_loss`` (forward + backward, and the
loss alone).

``ctc_loss_and_grad`` as a user calls it (the native engine where it builds, see :mod:`deploy_ctc._backends.cpu`),
the pure-NumPy backend, and torch (``loss.backward()``) run in the same process on the same float32 inputs,
interleaved, after a warm-up, beside the loss alone: ``ctc_loss`` against torch under ``torch.no_grad()``; the
report gives medians and their ratios to torch. Peak memory is measured in a fresh child process per
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

# (T, N, C, S): the torch documentation example, a long-target batch, a large vocabulary, a long utterance (the
# four shapes of the geometric means) ...
SHAPES = [(50, 16, 20, 30), (500, 32, 30, 100), (400, 16, 1000, 80), (1500, 8, 5000, 300)]
# ... then a small batch (a server's request), many short samples, and two long sequences.
EXTRA_SHAPES = [(100, 4, 50, 10), (20, 100000, 10, 4), (10000, 4, 50, 1000), (20000, 2, 30, 2000)]


#: The timed implementations: forward + backward by torch, deploy_ctc's default CPU backend and its pure-NumPy
#: backend; the loss alone by torch (no_grad) and deploy_ctc.
IMPLEMENTATIONS = ("torch", "deploy_ctc", "numpy_backend", "torch_loss", "deploy_ctc_loss")
#: Those whose peak memory is measured (forward + backward).
MEMORY_IMPLEMENTATIONS = ("torch", "deploy_ctc", "numpy_backend")


def _runners(inputs, numpy_backend=True):
    """``{name: f}`` for each of :data:`IMPLEMENTATIONS` (without ``numpy_backend``: but that one): each runs one
    forward + backward, or one loss, on ``inputs``."""
    import torch

    from deploy_ctc import backends, ctc_loss, ctc_loss_and_grad

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

    def run_torch_loss():
        with torch.no_grad():
            return torch.nn.functional.ctc_loss(t_lp, *t_args)

    def run_deploy_ctc_loss():
        return ctc_loss(log_probs, targets, input_lengths, target_lengths)

    runners = {"torch": run_torch, "deploy_ctc": run_deploy_ctc, "numpy_backend": run_numpy_backend,
               "torch_loss": run_torch_loss, "deploy_ctc_loss": run_deploy_ctc_loss}
    if not numpy_backend:
        del runners["numpy_backend"]
    return runners


def time_shape(shape, repeats, progress=None, logit_scale=1.0, numpy_backend=True):
    """Median seconds of each implementation on ``shape``, interleaved runs after one warm-up each (one round only
    when a warm-up takes over 20 s)."""
    return interleaved_medians(_runners(make_inputs(*shape, logit_scale=logit_scale), numpy_backend), repeats,
                               progress, slow_s=20.0)


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


def run(shapes=SHAPES, repeats=7, memory=True, stream=sys.stderr, logit_scale=1.0, numpy_backend=True):
    """Time (and measure memory of) every shape; progress goes to ``stream``. Returns the result dict; its geometric
    means are over the shapes of :data:`SHAPES` among ``shapes`` (all of them when none is)."""
    results = []
    for index, shape in enumerate(shapes, 1):
        label = f"[{index}/{len(shapes)}] (T,N,C,S)={shape}"

        def progress(done, total, label=label):
            stream.write(f"\r{label} timing {done}/{total}")
            stream.flush()

        medians = time_shape(shape, repeats, progress, logit_scale, numpy_backend)
        row = {"shape": list(shape)}
        for name, seconds in medians.items():
            row[f"{name}_ms"] = seconds * 1e3
        row["speedup"] = medians["torch"] / medians["deploy_ctc"]
        row["loss_speedup"] = medians["torch_loss"] / medians["deploy_ctc_loss"]
        row["loss_over_loss_and_grad"] = medians["deploy_ctc_loss"] / medians["deploy_ctc"]
        if numpy_backend:
            row["numpy_backend_speedup"] = medians["torch"] / medians["numpy_backend"]
        if memory:
            stream.write(f"\r{label} peak memory          ")
            stream.flush()
            for name in MEMORY_IMPLEMENTATIONS if numpy_backend else MEMORY_IMPLEMENTATIONS[:2]:
                row[f"{name}_peak_mb"] = peak_memory(name, shape, logit_scale) / 2**20
        stream.write(f"\r{label} done: {row['speedup']:.2f}x, loss alone {row['loss_speedup']:.2f}x     \n")
        results.append(row)
    from deploy_ctc import backends

    main_rows = [row for row in results if tuple(row["shape"]) in SHAPES] or results
    report = {"benchmark": "CTC loss forward+backward and loss alone, float32, CPU",
              "machine": machine_description(), "deploy_ctc_backend": backends.cpu_backend(),
              "logit_scale": logit_scale, "repeats": repeats, "rows": results,
              "geomean_shapes": [row["shape"] for row in main_rows]}
    for key, prefix in (("speedup", ""), ("loss_speedup", "loss_"), ("numpy_backend_speedup", "numpy_backend_")):
        if key in results[0]:
            report[f"{prefix}geomean_speedup"] = _geomean([row[key] for row in main_rows])
            report[f"{prefix}min_speedup"] = min(row[key] for row in results)
    report["max_loss_over_loss_and_grad"] = max(row["loss_over_loss_and_grad"] for row in results)
    return report


def _geomean(values):
    return float(np.exp(np.mean(np.log(values))))


def format_table(report):
    """A Markdown table of ``report`` (as returned by :func:`run`)."""
    rows = report["rows"]
    memory = "torch_peak_mb" in rows[0]
    numpy_backend = "numpy_backend_ms" in rows[0]
    backend = report["deploy_ctc_backend"]
    head = (f"| (T, N, C, S) | torch (ms) | deploy_ctc, {backend} (ms) | speed-up | torch no_grad (ms) | "
            f"deploy_ctc loss (ms) | speed-up | loss / loss+grad |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if numpy_backend:
        head += " NumPy backend (ms) | speed-up |"
        rule += "---:|---:|"
    memory_names = [name for name in MEMORY_IMPLEMENTATIONS if f"{name}_peak_mb" in rows[0]]
    if memory:
        head += "".join(f" peak MB {name.replace('_', ' ')} |" for name in memory_names)
        rule += "---:|" * len(memory_names)
    lines = [head, rule]
    for row in rows:
        line = (f"| {tuple(row['shape'])} | {row['torch_ms']:.1f} | {row['deploy_ctc_ms']:.1f} | "
                f"{row['speedup']:.2f}x | {row['torch_loss_ms']:.1f} | {row['deploy_ctc_loss_ms']:.1f} | "
                f"{row['loss_speedup']:.2f}x | {row['loss_over_loss_and_grad']:.2f} |")
        if numpy_backend:
            line += f" {row['numpy_backend_ms']:.1f} | {row['numpy_backend_speedup']:.2f}x |"
        if memory:
            line += " " + " | ".join(f"{row[f'{name}_peak_mb']:.0f}" for name in memory_names) + " |"
        lines.append(line)
    m = report["machine"]
    shapes = ", ".join(str(tuple(shape)) for shape in report["geomean_shapes"])
    summary = (f"Geometric means over {shapes}: forward+backward {report['geomean_speedup']:.2f}x, loss alone "
               f"{report['loss_geomean_speedup']:.2f}x (lowest over all rows {report['min_speedup']:.2f}x and "
               f"{report['loss_min_speedup']:.2f}x; loss alone at most {report['max_loss_over_loss_and_grad']:.2f} "
               f"of forward+backward)")
    if numpy_backend:
        summary += (f"; pure-NumPy backend {report['numpy_backend_geomean_speedup']:.2f}x (lowest "
                    f"{report['numpy_backend_min_speedup']:.2f}x)")
    lines.append("")
    lines.append(f"{summary}. deploy_ctc: {backend} backend; medians of {report['repeats']} interleaved runs; logits "
                 f"x{report['logit_scale']:g}; {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
                 f"({m['torch_threads']} threads), numpy {m['numpy']}.")
    return "\n".join(lines)


def main(argv=None, prog="bench_cpu.py"):
    """Run the CPU benchmark, print the table, write JSON; returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Time deploy_ctc's CPU backends against torch.nn.functional.ctc_loss (forward and backward, float32) and "
        "measure their peak memory; print a Markdown table and optionally write JSON."))
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation and shape")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file for the results (default: print only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--quick", action="store_true", help="only the two smallest shapes, 3 repeats")
    parser.add_argument("--extra", action="store_true",
                        help="also a small batch, many short samples and two long sequences (minutes for torch)")
    parser.add_argument("--extra-only", action="store_true",
                        help="only the shapes --extra adds (the geometric means are then over them)")
    parser.add_argument("--no-numpy", action="store_true", help="skip the pure-NumPy backend")
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
    if args.quick:
        shapes, repeats = SHAPES[:2], 3
    else:
        shapes = EXTRA_SHAPES if args.extra_only else SHAPES + (EXTRA_SHAPES if args.extra else [])
        repeats = args.repeats
    report = run(shapes, repeats, memory=not args.no_memory, logit_scale=args.logit_scale,
                 numpy_backend=not args.no_numpy)
    print(format_table(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["--output", str(RESULTS)]))
