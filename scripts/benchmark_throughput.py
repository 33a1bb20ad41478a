"""Throughput benchmarks: data loaders, the model's training step, and end-to-end training.

    make bench   # = .venv/bin/python scripts/benchmark_throughput.py --what all --device auto --json bench/throughput.json
    .venv/bin/cxr-benchmark --what model --device cuda --json bench/model.json   # the same, installed alias

A thin wrapper: the code and its full description live in `train/benchmark.py` (`--help` prints it).
"""

from train.benchmark import main

if __name__ == "__main__":
    main()
