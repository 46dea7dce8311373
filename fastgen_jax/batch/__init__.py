"""Offline batch jobs over JSONL files: the OpenAI Batch format or the simple one, resumable.

`formats` turns input lines into jobs and renders their output lines, `output` owns the results
file (append, resume, reorder), and `job.run_batch` drives the engine. The entry point is
`python -m fastgen_jax.generate --input=... --output=...`.
"""
