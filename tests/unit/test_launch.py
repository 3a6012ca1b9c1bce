"""`lmforge train --nproc/--nnodes`: the torchrun command lmforge starts, and launch options that
cannot work (refused before anything runs)."""

import pytest

from lmforge.errors import UserError
from lmforge.launch import Launch, check_launch, torchrun_command


@pytest.mark.parametrize(
    ("launch", "environment", "message"),
    [
        (Launch(2, nnodes=2), {}, "--nnodes 2: give --master-addr"),
        (Launch(2, nnodes=2, node_rank=2, master_addr="h"), {}, "--node-rank 2: the machines of a job of --nnodes 2"),
        (Launch(2), {"WORLD_SIZE": "2"}, "this process is already one of a job"),
    ],
)
def test_launch_options_that_cannot_work_are_refused(monkeypatch, launch, environment, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message):
        check_launch(launch)


def test_the_torchrun_command():
    one = torchrun_command(Launch(4), ["train", "c.yaml"])
    assert one[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=4",
        "--standalone",
        "-m",
        "lmforge",
        "train",
        "c.yaml",
    ]
    two = torchrun_command(Launch(8, 2, 1, "10.0.0.1"), ["train", "c.yaml"])
    assert two[4:8] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"]
