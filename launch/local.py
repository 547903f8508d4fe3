"""Run N `hylo` processes on this machine, as a multi-host job would (explicit coordinator).

    python launch/local.py --processes 2 [--cpu-devices 4 | --gpus-per-process 4] -- train --config run.yaml

Process i gets --coordinator localhost:PORT --num-processes N --process-id i. On CPU each process gets
`--cpu-devices` simulated devices; on GPU, CUDA_VISIBLE_DEVICES splits the GPUs. Output lines are
prefixed with the process rank; the exit status is the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--cpu-devices", type=int, help="simulated CPU devices per process (JAX_PLATFORMS=cpu)")
    ap.add_argument("--gpus-per-process", type=int, help="GPUs per process (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    ap.add_argument("hylo_args", nargs=argparse.REMAINDER, help="-- then the hylo command and its arguments")
    args = ap.parse_args()
    hylo_args = args.hylo_args[1:] if args.hylo_args[:1] == ["--"] else args.hylo_args
    if not hylo_args:
        ap.error("give the hylo command after --, e.g. -- train --config run.yaml")
    port = args.port or free_port()
    procs = []
    for i in range(args.processes):
        env = dict(os.environ)
        if args.cpu_devices:
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={args.cpu_devices}")
        if args.gpus_per_process:
            first = i * args.gpus_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(args.gpus_per_process))
        cmd = [sys.executable, "-m", "hylo_jax.cli", *hylo_args[:1], "--coordinator", f"localhost:{port}",
               "--num-processes", str(args.processes), "--process-id", str(i), *hylo_args[1:]]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def pump(i, proc):
        for line in proc.stdout:
            sys.stdout.write(f"[{i}] {line}")

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
