"""Every collective of the package goes through sapo_megatron.collectives, which picks the group's device.

A CPU tensor handed to an NCCL group fails at the first GPU step with PP or DP > 1; code tested over gloo never
shows it. The scan below reads every import and call in the package (inside functions too) and fails on a
direct torch.distributed collective outside the helper module.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sapo_megatron import collectives

PACKAGE = Path(__file__).resolve().parents[2] / "sapo_megatron"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
    "gather_object", "scatter_object_list", "barrier", "send", "recv", "isend", "irecv",
}


def direct_collectives(source: str) -> list[str]:
    """``line: call`` of every torch.distributed collective called directly in ``source``."""
    tree = ast.parse(source)
    aliases = set()  # names bound to the torch.distributed module
    imported = set()  # collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch":
                aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
            elif node.module == "torch.distributed":
                imported.update(a.asname or a.name for a in node.names if a.name in COLLECTIVES)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in imported:
            found.append(f"{node.lineno}: {func.id}")
        elif isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            owner = ast.unparse(func.value)
            if owner in aliases or owner == "torch.distributed":
                found.append(f"{node.lineno}: {owner}.{func.attr}")
    return found


def test_no_direct_torch_distributed_collective_outside_the_helper():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "collectives.py" and path.parent == PACKAGE:
            continue
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{hit}" for hit in direct_collectives(path.read_text())]
    assert not offenders, "call these through sapo_megatron.collectives:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "source",
    [
        "import torch.distributed as dist\ndef f(t):\n    dist.all_reduce(t)\n",
        "import torch\ndef f(t):\n    torch.distributed.broadcast(t, src=0)\n",
        "from torch import distributed as d\nd.barrier()\n",
        "def f(x):\n    from torch.distributed import all_gather_object\n    all_gather_object([None], x)\n",
    ],
)
def test_the_scan_finds_direct_collectives_wherever_they_hide(source):
    assert len(direct_collectives(source)) == 1


def test_the_scan_leaves_other_calls_alone():
    source = "import torch.distributed as dist\ndist.get_rank()\ngroup.allgather([a], [b])\nx.broadcast(1)\n"
    assert direct_collectives(source) == []


@pytest.fixture
def single_process_group(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_helpers_run_over_gloo_on_the_cpu(single_process_group):
    assert collectives.device_for() == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce(t, op=collectives.ReduceOp.MAX) is t and t.tolist() == [1.0, 2.0]
    assert [p.tolist() for p in collectives.all_gather(torch.tensor([3, 4]))] == [[3, 4]]
    assert collectives.broadcast(torch.tensor([5]), src=0).tolist() == [5]
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
    assert collectives.broadcast_object("x", src=0) == "x"
    collectives.barrier()
