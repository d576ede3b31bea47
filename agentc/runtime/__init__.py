"""The compiled agent and its runtime: the directory train.py writes and every reader checks
(agent.py), the engine (engine.py: a static KV cache of B rows, batched decoding, sampling, the
cached prefix), the episode loop (episode.py: one episode at a time, or continuous batching),
tool calls that follow their JSON schemas (constrain.py), evaluation over fresh tasks (evaluate.py)
and export to other runtimes (export.py). infer.py at the root is its command line."""
