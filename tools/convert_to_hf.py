"""Converts a Megatron dist-checkpoint written by the trainer into a Hugging Face model directory.

    python tools/convert_to_hf.py runs/tiny_cpu_sapo/checkpoints hf_out
    python tools/convert_to_hf.py runs/x/checkpoints/step_000020 hf_out --max-shard-bytes 2GiB

The same as `sapo-megatron convert`; see sapo_megatron/convert.py.
"""

from __future__ import annotations

import sys

from sapo_megatron.convert import main

if __name__ == "__main__":
    sys.exit(main())
