#!/bin/bash
#SBATCH --job-name=hpcs-bench_rm_-rf_
#SBATCH --output=/shared/alice/hpcs/programs/20260101-000000-abcdef/output.log
#SBATCH --open-mode=append
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=4
#SBATCH --time=30
#SBATCH --mem=8192M
#SBATCH --gpus-per-node=1
#SBATCH --partition=standard
#SBATCH --account=proj1
#SBATCH --qos=high
#SBATCH --mail-type=FAIL
#
# hpc-serverless program job 20260101-000000-abcdef (its record: /shared/alice/hpcs/programs/20260101-000000-abcdef/record.json)

# site setup
module load python/3.11
source /opt/venv/bin/activate

# environment
export OMP_PROC_BIND=close
export HPC_SERVERLESS_JOB_DIR=/shared/alice/hpcs/programs/20260101-000000-abcdef
export MY_VAR='a value; with $(danger) '"'"'quotes'"'"''

cd /shared/alice/hpcs/programs/20260101-000000-abcdef/workdir || exit 1
# arguments: /shared/alice/hpcs/programs/20260101-000000-abcdef/arguments (get_arguments()); result: /shared/alice/hpcs/programs/20260101-000000-abcdef/result (save_result())
exec /opt/venv/bin/python -c 'import os, sys; _c = os.path.realpath(os.getcwd()); _s = sys.path[:]; sys.path[:] = [p for p in _s if p and os.path.realpath(p) != _c]; import hpc_serverless; sys.path[:] = [p for p in _s if p]; from hpc_serverless.core.launch import main; main()' -m hpc_serverless.runtime.program_runner /shared/alice/hpcs/programs/20260101-000000-abcdef 'my script.py'
