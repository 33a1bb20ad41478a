"""One rank of the 2-rank loader test; run by tests/pipelines/test_loaders.py.

ACCELERATE_USE_CPU=1 .venv/bin/torchrun --nproc_per_node 2 --master_port PORT \
    tests/pipelines/_two_rank_worker.py SHARDS_DIR LOADER OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines.gather import gather_predictions
from pipelines.loaders import build_loader
from pipelines.spec import PreprocessSpec


def main() -> None:
    shards, loader_name, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = PreprocessSpec.from_manifest(shards, image_size=32)
    common = {"spec": spec, "loader": loader_name, "rank": rank, "world_size": world, "num_workers": 1, "seed": 7}
    train = build_loader(shards, "train", per_device_batch_size=5, train=True, **common)
    train_keys, train_batches = [], 0
    for batch in train:
        # A collective per step, as DDP's all-reduce does: unequal batch counts would hang here.
        dist.all_reduce(torch.ones(1))
        train_keys += batch.keys
        train_batches += 1
    evaluation = build_loader(shards, "test", per_device_batch_size=3, train=False, **common)
    keys, probs, labels = [], [], []
    for batch in evaluation:
        dist.all_reduce(torch.ones(1))
        keys += batch.keys
        probs.append(batch.images.mean(dim=(1, 2, 3)))
        labels.append(batch.labels)
    all_keys, _, all_labels = gather_predictions(keys, torch.cat(probs), torch.cat(labels))
    record = {"rank": rank, "train_keys": train_keys, "train_batches": train_batches, "train_len": len(train),
              "eval_keys": keys, "eval_len": len(evaluation), "gathered_keys": all_keys,
              "gathered_labels": all_labels.tolist(), "name": train.name, "env_cpu": os.environ.get("ACCELERATE_USE_CPU")}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
