#!/bin/bash
#PBS -N hvqe_id_
#PBS -q debug
#PBS -A QuantumSim
#PBS -l select=2:ncpus=8:mpiprocs=1:mem=16384mb,walltime=01:00:00,place=scatter
#
# hpc-serverless program job 20260101-000000-abcdef (its record: /lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef/record.json)

# what the job creates (its log, the program's files) is private, whatever the umask
umask 0077
# output goes live to the shared filesystem (PBS copies -o files back only at the end)
exec >> /lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef/output.log 2>&1

# site setup
module use /soft/modulefiles
module load conda

# environment
export HPC_SERVERLESS_JOB_DIR=/lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef

cd /lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef/workdir || exit 1
# arguments: /lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef/arguments (get_arguments()); result: /lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef/result (save_result())
exec /opt/venv/bin/python -c 'import os, sys; _c = os.path.realpath(os.getcwd()); _s = sys.path[:]; sys.path[:] = [p for p in _s if p and os.path.realpath(p) != _c]; import hpc_serverless; sys.path[:] = [p for p in _s if p]; from hpc_serverless.core.launch import main; main()' -m hpc_serverless.runtime.program_runner /lus/eagle/projects/qc/hpcs/programs/20260101-000000-abcdef main.py
