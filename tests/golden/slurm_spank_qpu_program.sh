#!/bin/bash
#SBATCH --job-name=hpcs-sweep
#SBATCH --output=/shared/alice/hpcs/programs/JOBID/output.log
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=30
#SBATCH --partition=quantum
#SBATCH --qpu=ibm_fez,ibm_marrakesh
#SBATCH --gres=qpu:2
#
# hpc-serverless program job JOBID (its record: /shared/alice/hpcs/programs/JOBID/record.json)

# site setup
# (none)

# environment
export HPC_SERVERLESS_QPU_PLAN='{"choices": ["ibm_fez", "ibm_marrakesh"], "count": 2, "counted_by": "spank", "devices": [{"backend": null, "name": "ibm_fez", "options": {}, "resource": "", "token_env": null, "type": "qrmi"}, {"backend": null, "name": "ibm_marrakesh", "options": {}, "resource": "", "token_env": null, "type": "qrmi"}]}'
export HPC_SERVERLESS_JOB_DIR=/shared/alice/hpcs/programs/JOBID
export HPC_SERVERLESS_STORE=/shared/alice/hpcs/store
export PYTHONUNBUFFERED=1

cd /shared/alice/hpcs/programs/JOBID/workdir || exit 1
# arguments: /shared/alice/hpcs/programs/JOBID/arguments (get_arguments()); result: /shared/alice/hpcs/programs/JOBID/result (save_result())
exec /opt/venv/bin/python -c 'import os, sys; _c = os.path.realpath(os.getcwd()); _s = sys.path[:]; sys.path[:] = [p for p in _s if p and os.path.realpath(p) != _c]; import hpc_serverless; sys.path[:] = [p for p in _s if p]; from hpc_serverless.core.launch import main; main()' -m hpc_serverless.runtime.program_runner /shared/alice/hpcs/programs/JOBID main.py
