"""Submitting Programs over SSH: one reused paramiko connection vs one `ssh` per command.

    python benchmarks/ssh_programs.py [--n 50] [--host 127.0.0.1] [--port 2222] [--user root]
                                      [--key ~/.ssh/id_ed25519] [--known-hosts FILE]

Ours: `run_program` N times through a provider with a host (one connection carries the
staging tar stream, the SFTP writes of arguments/record/script, and sbatch).
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

    src = Path(tempfile.mkdtemp(prefix="hpcs-bench-src-"))
    (src / "main.py").write_text("print('hello')\n")
    remote_root = f"/tmp/hpcs-bench-ssh-{os.getpid()}"
    s = QuantumServerless({"providers": [{
        "name": "remote", "site": a.site, "host": a.host, "port": a.port, "username": a.user,
        "key_filename": a.key, "known_hosts": a.known_hosts, "storage": remote_root}]})
    s.set_provider("remote")
    program = Program("bench", "main.py", working_dir=str(src), target={"time": 1})
    s.provider("remote").transport.run(["true"])  # connect once, outside the timing
    t0 = time.perf_counter()
    for _ in range(a.n):
        s.run_program(program)
    ours = time.perf_counter() - t0

    ssh = ["ssh", "-i", a.key, "-p", str(a.port), "-o", f"UserKnownHostsFile={a.known_hosts}",
           "-o", "BatchMode=yes", f"{a.user}@{a.host}"]
    script = "#!/bin/bash\n#SBATCH --time=1\n#SBATCH --output=out.log\ncd workdir && python3 main.py\n"
    t0 = time.perf_counter()
    for i in range(a.n):
        d = shlex.quote(f"{remote_root}/baseline/{i}")
        subprocess.run([*ssh, f"mkdir -p {d}/workdir"], check=True)
        tar = subprocess.Popen(["tar", "-c", "-C", str(src), "."], stdout=subprocess.PIPE)
        subprocess.run([*ssh, f"tar -x -C {d}/workdir -f -"], stdin=tar.stdout, check=True)
        tar.wait()
        subprocess.run([*ssh, f"cat > {d}/job.sh"], input=script.encode(), check=True)
        subprocess.run([*ssh, f"cd {d} && sbatch --parsable job.sh"], check=True, capture_output=True)
    base = time.perf_counter() - t0
    print(f"{a.n} programs over one reused connection: {ours:.2f} s ({a.n / ours:.1f}/s)")
    print(f"{a.n} programs, one ssh process per command: {base:.2f} s ({a.n / base:.1f}/s)")
    print(f"ratio (ssh per command / ours): {base / ours:.2f}x")


if __name__ == "__main__":
    main()
