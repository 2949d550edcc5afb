"""Submitting Programs over SSH: one reused paramiko connection vs one `ssh` per command.

    python benchmarks/ssh_programs.py [--n 50] [--host 127.0.0.1] [--port 2222] [--user root]
                                      [--key ~/.ssh/id_ed25519] [--known-hosts FILE]

Ours: `run_program` N times through a provider with a host (one agent request each,
over one connection, carries the working dir as a tar; the agent on the login node writes
the record, arguments and script and runs sbatch).
Baseline: what a shell script would do for each program with the OpenSSH client: `ssh
mkdir`, `tar c | ssh tar x`, `ssh 'cat > job.sh'`, `ssh sbatch` (four ssh processes,
each a new connection). Both submit the same trivial program to the same cluster.
Prints the two times, programs/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from hpc_serverless import Program, QuantumServerless


def bench_ssh(n: int, site: str = "site_configs/localhost-slurm.yaml", host: str = "127.0.0.1",
              port: int = 2222, user: str = "root", key: str = "/root/.ssh/hpcsl_test_key",
              known_hosts: str = "/root/.ssh/hpcsl_known_hosts") -> dict[str, float]:
    """`n` programs through one reused connection vs one `ssh` process per command."""
    src = Path(tempfile.mkdtemp(prefix="hpcs-bench-src-"))
    (src / "main.py").write_text("print('hello')\n")
    remote_root = f"/tmp/hpcs-bench-ssh-{os.getpid()}"
    s = QuantumServerless({"providers": [{
        "name": "remote", "site": site, "host": host, "port": port, "username": user,
        "key_filename": key, "known_hosts": known_hosts, "storage": remote_root}]})
    s.set_provider("remote")
    program = Program("bench", "main.py", working_dir=str(src), target={"time": 1})
    s.provider("remote").agent.connect()  # connect and start the agent once, outside the timing
    t0 = time.perf_counter()
    for _ in range(n):
        s.run_program(program)
    ours = time.perf_counter() - t0

    ssh = ["ssh", "-i", key, "-p", str(port), "-o", f"UserKnownHostsFile={known_hosts}",
           "-o", "BatchMode=yes", f"{user}@{host}"]
    script = "#!/bin/bash\n#SBATCH --time=1\n#SBATCH --output=out.log\ncd workdir && python3 main.py\n"
    t0 = time.perf_counter()
    for i in range(n):
        d = shlex.quote(f"{remote_root}/baseline/{i}")
        subprocess.run([*ssh, f"mkdir -p {d}/workdir"], check=True)
        tar = subprocess.Popen(["tar", "-c", "-C", str(src), "."], stdout=subprocess.PIPE)
        subprocess.run([*ssh, f"tar -x -C {d}/workdir -f -"], stdin=tar.stdout, check=True)
        tar.wait()
        subprocess.run([*ssh, f"cat > {d}/job.sh"], input=script.encode(), check=True)
        subprocess.run([*ssh, f"cd {d} && sbatch --parsable job.sh"], check=True, capture_output=True)
    base = time.perf_counter() - t0
    return {"programs": n, "ours_s": ours, "ssh_per_command_s": base, "ours_programs_per_s": n / ours,
            "ssh_per_command_programs_per_s": n / base, "speed_ratio": base / ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--site", default="site_configs/localhost-slurm.yaml")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2222)
    ap.add_argument("--user", default="root")
    ap.add_argument("--key", default="/root/.ssh/hpcsl_test_key")
    ap.add_argument("--known-hosts", default="/root/.ssh/hpcsl_known_hosts")
    a = ap.parse_args()
    r = bench_ssh(a.n, a.site, a.host, a.port, a.user, a.key, a.known_hosts)
    print(f"{a.n} programs over one reused connection: {r['ours_s']:.2f} s ({r['ours_programs_per_s']:.1f}/s)")
    print(f"{a.n} programs, one ssh process per command: {r['ssh_per_command_s']:.2f} s "
          f"({r['ssh_per_command_programs_per_s']:.1f}/s)")
    print(f"ratio (ssh per command / ours): {r['speed_ratio']:.2f}x")


if __name__ == "__main__":
    main()
