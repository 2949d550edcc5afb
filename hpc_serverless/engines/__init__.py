"""Engines that run tasks and programs: the local process pool, the batch engine (one
scheduler job or array per batch of calls), the pilot engine (dask workers in batch jobs),
and program jobs on a batch site. Providers compose them; engines know no provider."""
