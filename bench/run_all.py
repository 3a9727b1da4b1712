"""``make bench``: the whole-system benchmark (adaptive-DDNN paper Tables II-IV) for every shipped model
(models/*.npz), written to bench/out/ (bench_system.md, bench_system.json, bench_*.png).

MNIST models need DDNN_DATA_DIR (or --data-dir); a model whose data set is missing is skipped and named in
the JSON. The component benchmarks (bench_c.py, bench_binding.py, bench_opencl.py, bench_server.py) take
minutes each on a small machine, so they run only with --components.

Usage: python bench/run_all.py [--samples N] [--data-dir DIR] [--components]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from ddnn_gen.bench.report import write_report
from ddnn_gen.bench.system import BenchConfig, clean_json, run_bench, write_json

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("bench_c.py", "bench_binding.py", "bench_opencl.py", "bench_server.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--components", action="store_true", help="also run the component benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    models = sorted((REPO / "models").glob("*.npz"))
    if not models:
        print("no models in models/*.npz", file=sys.stderr)
        return 1
    started = time.monotonic()
    config = BenchConfig(models=models, out_dir=args.out, samples=args.samples, data_dir=args.data_dir)
    result = run_bench(config)
    write_json(result, args.out / "bench_system.json")
    files = write_report(clean_json(result), args.out)
    print(files["tables"].read_text())
    print(f"wrote {args.out / 'bench_system.json'}, " + ", ".join(str(p) for p in files.values())
          + f" in {time.monotonic() - started:.0f} s")
    if args.components:
        for script in COMPONENTS:
            subprocess.run([sys.executable, str(REPO / "bench" / script)], check=False)
    else:
        print("component benchmarks: python bench/bench_c.py (C vs Chainer), bench/bench_opencl.py (OpenCL vs C), "
              "bench/bench_server.py (MQTT vs raw forward); or bench/run_all.py --components")
    return 0


if __name__ == "__main__":
    sys.exit(main())
