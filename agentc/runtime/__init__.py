"""The compiled agent outside its engine: the directory train.py writes and every reader checks
(agent.py), evaluation over fresh tasks (evaluate.py), and export to other runtimes (export.py).
The engine and the episode loop are infer.py's, at the repository root."""
