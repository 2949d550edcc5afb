"""Adapters to the outside: scheduler commands and their output (schedulers/), how commands
reach the site (transport/), batch-script rendering, the agent's wire format, and the one
module per third-party library whose private surface we still touch."""
