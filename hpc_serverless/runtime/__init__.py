"""What runs inside a job or worker process: the task worker, the program runner,
checkpoints and the local pool's worker. Imports only core."""
