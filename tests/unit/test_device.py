"""The one device rule (sapo_megatron.device) that the trainer, the actor and the bridge share."""

from __future__ import annotations

import pytest
import torch

from sapo_megatron.device import resolve_device


def test_resolve_device():
    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") == here
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    # A check or a plan for a GPU machine resolves cuda anywhere.
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="trainer.device='tpu'"):
        resolve_device("tpu", name="trainer.device")
    with pytest.raises(ValueError, match="device='gpu0': not a device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_run_on_cuda_needs_a_cuda_device():
    with pytest.raises(ValueError, match="trainer.device=cuda but no CUDA device is available; use trainer.device=cpu"):
        resolve_device("cuda", name="trainer.device", must_exist=True)
