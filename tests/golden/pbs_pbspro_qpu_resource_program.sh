#!/bin/bash
#PBS -N hsweep
#PBS -q debug
#PBS -l select=1:ncpus=1:mpiprocs=1,walltime=01:00:00
#PBS -l ibm_kingston=1
#
# hpc-serverless program job JOBID (its record: /lus/eagle/projects/qc/hpcs/programs/JOBID/record.json)

# what the job creates (its log, the program's files) is private, whatever the umask
umask 0077
# output goes live to the shared filesystem (PBS copies -o files back only at the end)
exec >> /lus/eagle/projects/qc/hpcs/programs/JOBID/output.log 2>&1

# site setup
# (none)

# environment
export HPC_SERVERLESS_QPU_PLAN='{"choices": ["ibm_kingston"], "count": 1, "counted_by": "resource", "devices": [{"backend": null, "name": "ibm_kingston", "options": {}, "resource": "", "token_env": null, "type": "aer"}]}'
export HPC_SERVERLESS_JOB_DIR=/lus/eagle/projects/qc/hpcs/programs/JOBID
export HPC_SERVERLESS_STORE=/lus/eagle/projects/qc/hpcs/store
export PYTHONUNBUFFERED=1

cd /lus/eagle/projects/qc/hpcs/programs/JOBID/workdir || exit 1
# arguments: /lus/eagle/projects/qc/hpcs/programs/JOBID/arguments (get_arguments()); result: /lus/eagle/projects/qc/hpcs/programs/JOBID/result (save_result())
exec /opt/venv/bin/python -c 'import os, sys; _c = os.path.realpath(os.getcwd()); _s = sys.path[:]; sys.path[:] = [p for p in _s if p and os.path.realpath(p) != _c]; import hpc_serverless; sys.path[:] = [p for p in _s if p]; from hpc_serverless.core.launch import main; main()' -m hpc_serverless.runtime.program_runner /lus/eagle/projects/qc/hpcs/programs/JOBID main.py
