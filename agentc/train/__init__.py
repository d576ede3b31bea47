"""The machinery of a training run that train.py calls but a reader of its loop need not see: the
run directory's checkpoints (checkpoints.py: atomic writes, checksums, resume, sharded state) and
the model a run starts from (init_from.py: a preset from scratch, a GGUF file, a Hugging Face or
agentc checkpoint, rotary scaling) and what it logs (metrics.py: metrics.jsonl, W&B). It sits above
the runtime: a checkpoint is a compiled agent."""
