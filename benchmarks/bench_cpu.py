"""CPU benchmark of deploy_ctc against torch.nn.functional.ctc_loss (forward + backward, float32).

Usage: python benchmarks/bench_cpu.py [--repeats 7] [--output benchmarks/results/bench_cpu.json]
(the same as `deploy-ctc bench`). The measuring code lives in deploy_ctc/benchmark.py so the installed CLI can run it.
"""

import sys

from deploy_ctc.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["--output", "benchmarks/results/bench_cpu.json"]))
