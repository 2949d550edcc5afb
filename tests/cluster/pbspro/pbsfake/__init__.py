"""A FAKE PBS Pro server: PBS Pro's commands on the outside, the test cluster's Slurm inside.

THIS IS NOT PBS PRO. No PBS server can be installed on the test machine, so these
commands (``qsub``, ``qstat``, ``qdel``, ``qrerun`` beside this package) speak PBS Pro's
dialect and drive the real Slurm underneath:

* ``qsub`` reads ``#PBS`` lines and the command line (the command line wins), checks what
  PBS Pro would check, and submits one ``sbatch`` whose batch step runs ``mom.py``;
* ``mom.py`` plays the execution host's MoM inside that Slurm job: a PBS-only
  environment (no ``SLURM_*``), ``$PBS_NODEFILE``, the job starting in ``$HOME``, the
  walltime enforced to the second, stdout/stderr delivered to ``-o``/``-e`` at the end,
  and the job's ``Exit_status`` recorded in the spool;
* ``qstat -f -F json -x`` rebuilds PBS Pro's job attributes from ``sacct``/``squeue``
  and that spool; ``qdel`` is ``scancel``; ``qrerun`` is ``scontrol requeue``.
* QPUs: the server resources of ``common.SERVER_RESOURCES`` (``-l aer=1``) and the PBS
  QRMI hook's ``-l quantum_resources=...`` become Slurm licenses (``sbatch --licenses``),
  so one job at a time holds each QPU; the fake EMULATES the hook (it cannot run here):
  mom.py exports its QRMI_JOB_QPU_RESOURCES/QRMI_JOB_QPU_TYPES/QRMI_LIST_DELIMITER.

Job ids are Slurm's: ``123.pbsserver`` is Slurm job 123 and ``123[].pbsserver`` the Slurm
array 123. Everything it cannot emulate it REFUSES (non-zero exit, ``qsub: ...`` on stderr)
instead of accepting silently. Sources for PBS Pro's behaviour are cited where used.
Stdlib only: jobs run it with the system python3, as root or as other users.
"""
