"""Core values: errors, targets, serialization, object refs, the object store, task calls.

The bottom layer: it imports nothing of ours from above (see docs/architecture.md). What a
ref needs from the engine that runs its task it asks through the `TaskBackend` protocol
defined here (refs.py), so core never imports an engine.
"""
