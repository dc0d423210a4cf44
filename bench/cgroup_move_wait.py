#!/usr/bin/env python3
"""How long a cgroup v1 task move waits, cold and shortly after another move (root only).

Each round: a no-op move of this process into the cgroup it is already in (pids hierarchy),
then, DELAY ms later, a real move of a sleeping child into a scratch cgroup. Prints the median
of both per DELAY. A move within ~10 ms of another skips the kernel's RCU grace period
(`cgroup_threadgroup_rwsem` switching to its writer side); see BENCHMARKS.md, "OCI sandbox start".
Usage: sudo python3 bench/cgroup_move_wait.py [ROUNDS]
"""
import os
import statistics
import subprocess
import sys
import time

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
own = next(l.split(":", 2)[2] for l in open("/proc/self/cgroup").read().splitlines() if l.split(":")[1] == "pids")
own_procs = f"/sys/fs/cgroup/pids{own.rstrip('/')}/cgroup.procs"
scratch = "/sys/fs/cgroup/devices/pond-move-wait"
os.makedirs(scratch, exist_ok=True)
try:
    for delay_ms in (5, 10, 20, 40):
        noop, move = [], []
        for _ in range(rounds):
            child = subprocess.Popen(["sleep", "10"])
            time.sleep(0.1)  # a quiet spell: the next move is a cold one
            t0 = time.perf_counter()
            with open(own_procs, "w") as f:
                f.write(str(os.getpid()))
            t1 = time.perf_counter()
            time.sleep(delay_ms / 1000)
            t2 = time.perf_counter()
            with open(f"{scratch}/cgroup.procs", "w") as f:
                f.write(str(child.pid))
            t3 = time.perf_counter()
            noop.append((t1 - t0) * 1000)
            move.append((t3 - t2) * 1000)
            child.kill()
            child.wait()
        print(f"cold no-op move {statistics.median(noop):.2f} ms; a move {delay_ms} ms later "
              f"{statistics.median(move):.2f} ms (medians of {rounds})")
finally:
    os.rmdir(scratch)
