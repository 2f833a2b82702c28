"""The remote engine of the weight-sync tests: a vLLM engine in its own process, the last rank of a sync group.

Usage: worker_weight_sync_receiver.py OUT_FILE HF_DIR SYNC_PORT NUM_TRAINER_RANKS LABEL [LABEL ...]
Takes part in one push per LABEL (in the order of worker_weight_sync.py's remote scenario) and writes
``OUT_FILE`` = {"engine": {label: (weight_version, log-probs of FIXED_TOKENS)}, "stats": {...}, "errors": {...}}.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from worker_weight_sync import build_engine, engine_logprobs, fixed_tokens  # noqa: E402


def main(out_file: str, hf_dir: str, sync_port: str, num_trainer_ranks: str, *labels: str) -> None:
    from sapo_megatron.bridge.sync import SyncGroup, WeightReceiver, WeightSyncError

    engine = build_engine(hf_dir)
    trainers = int(num_trainer_ranks)
    group = SyncGroup.connect("127.0.0.1", int(sync_port), rank=trainers, world_size=trainers + 1, timeout_s=240)
    receiver = WeightReceiver(engine, group)
    tokens = fixed_tokens()
    out: dict = {"engine": {}, "stats": {}, "errors": {}}
    for label in labels:
        try:
            out["stats"][label] = dataclasses.asdict(receiver.receive())
        except WeightSyncError as exc:
            out["errors"][label] = str(exc)
        out["engine"][label] = (engine.weight_version, engine_logprobs(engine, tokens))
    torch.save(out, out_file)
    engine.close()
    print("receiver: done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
