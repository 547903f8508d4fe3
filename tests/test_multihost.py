"""Multi-host start-up rules, and a real two-process CPU job (jax.distributed on localhost) that trains,
checkpoints, restores and continues with the same losses as one process holding all the devices."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hylo_jax.errors import ConfigError
from hylo_jax.parallel.distributed import plan

ROOT = Path(__file__).resolve().parent.parent


def test_explicit_flags_and_environment():
    kw = plan(coordinator="h0:1234", num_processes=2, process_id=1, env={})
    assert kw == dict(coordinator_address="h0:1234", num_processes=2, process_id=1)
    env = {"HYLO_COORDINATOR": "h0:99", "HYLO_NUM_PROCESSES": "4", "HYLO_PROCESS_ID": "3",
           "HYLO_LOCAL_DEVICE_IDS": "0,1"}
    assert plan(env=env) == dict(coordinator_address="h0:99", num_processes=4, process_id=3, local_device_ids=[0, 1])
    assert plan(process_id=0, env=env)["process_id"] == 0  # flags win over the environment


def test_cluster_detection_and_single_process():
    assert plan(env={}) is None
    assert plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == {}
    assert plan(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert plan(env={"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert plan(mode="on", env={}) == {}
    assert plan(env={"HYLO_DISTRIBUTED": "1"}) == {}
    assert plan(env={"HYLO_DISTRIBUTED": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) is None


def test_incomplete_explicit_start_is_an_error():
    with pytest.raises(ConfigError, match=r"missing \['num_processes', 'process_id'\]"):
        plan(coordinator="h0:1", env={})
    with pytest.raises(ConfigError, match=r"process_id 2 outside \[0, 2\)"):
        plan(coordinator="h0:1", num_processes=2, process_id=2, env={})


# --------------------------------------------------------------------------------------------
# A real two-process job.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _config(tmp_path, out, steps):
    from test_resume import run_config

    path = run_config(tmp_path, out)
    cfg = yaml.safe_load(path.read_text())
    cfg["mesh"] = {"fsdp": 2, "sequence": 2}
    cfg["stage2"][0].update(steps=steps, warmup_ratio=0.0, min_lr_ratio=1.0, save_every=2,
                            global_batch_size=2)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config, processes: int, devices_per_process: int):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    port = _free_port()
    procs = []
    for i in range(processes):
        extra = ["--coordinator", f"localhost:{port}", "--num-processes", str(processes),
                 "--process-id", str(i)] if processes > 1 else []
        procs.append(subprocess.Popen([sys.executable, "-m", "hylo_jax.cli", "train", "--config", str(config),
                                       *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-5000:]
    return outputs


def _losses(out):
    rows = [json.loads(line) for line in (out / "kd" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


LARGEST = """
import sys, jax
from hylo_jax.parallel.distributed import largest_over_processes
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
me = jax.process_index()
print([largest_over_processes(value) for value in ([5, 0, 7, 2] if me == 0 else [1, 9, 7, 3])])
"""


def test_largest_over_processes_through_the_coordinator():
    """Four rounds between two real processes (the key-value store, no device collective), each its own max."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", LARGEST, str(port), str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "[5, 9, 7, 3]"


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
    from test_resume import tiny_teacher

    tiny_teacher(tmp_path / "teacher")
    one, two = tmp_path / "one", tmp_path / "two"
    # two processes x two devices: 4 steps, then the run is extended to 6 and resumes from step 4's checkpoint
    outputs = _launch(_config(tmp_path, two, steps=4), processes=2, devices_per_process=2)
    _launch(_config(tmp_path, one, steps=6), processes=1, devices_per_process=4)
    assert "process 1 of 2" in outputs[1] or "process 1 of 2" in "".join(outputs)
    shutil.rmtree(two / "kd" / "final")
    # the resumed half goes through the local launcher (launch/local.py), as a user would start it
    local = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--cpu-devices", "2", "--",
                            "train", "--config", str(_config(tmp_path, two, steps=6))],
                           cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                           timeout=900)
    assert local.returncode == 0, local.stdout[-5000:] + local.stderr[-2000:]
    assert "[0] " in local.stdout and "[kd] resuming at step 4" in local.stdout
    want, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)
    assert (two / "kd" / "final" / "config.yaml").is_file()
