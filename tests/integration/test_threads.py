"""train.num_threads left to lmforge: the physical cores this process may use (its CPU affinity and
cgroup quota, as taskset, a container or a SLURM job set them), where PyTorch's default would take
every core of the machine; OMP_NUM_THREADS wins where it is set. The plan line says which."""

import os
import subprocess

import joblib
import pytest
import yaml

from conftest import chapters, lmforge_command, subprocess_env, tiny_config_dict


def plan_of(tmp_path, env, pinned: set[int] | None = None, *args: str) -> str:
    (tmp_path / "corpus.txt").write_text("\n\n".join(chapters(20)) + "\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "corpus.txt", tmp_path / "cache", tmp_path / "runs")))
    proc = subprocess.run(
        lmforge_command("train", str(config), "--dry-run", *args),
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=(lambda: os.sched_setaffinity(0, pinned)) if pinned else None,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plans = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    return plans[0]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin a process to one of them")
def test_a_process_pinned_to_one_core_trains_with_one_thread(tmp_path):
    env = {k: v for k, v in subprocess_env().items() if k != "OMP_NUM_THREADS"}
    assert plan_of(tmp_path, env, pinned={0}).endswith(
        "1 CPU thread (the 1 core this process may use; train.num_threads)"
    )
    assert plan_of(tmp_path, env | {"OMP_NUM_THREADS": "1"}).endswith(
        "1 CPU thread (OMP_NUM_THREADS; train.num_threads)"
    )
    # lmforge train --nproc 2: each process gets half of the cores (torchrun alone would give each one)
    cores = joblib.cpu_count(only_physical_cores=True)
    each = f"{cores // 2} CPU thread{'s' * (cores // 2 != 1)}"
    assert plan_of(tmp_path, env, None, "--nproc", "2").endswith(
        f"{each} (the {cores} cores this process may use, shared by 2 processes; train.num_threads)"
    )
