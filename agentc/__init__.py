"""agentc: compile an agent workflow into the weights of a transformer.

The library, one import package: workflows (tools, tasks, teachers, checkers) <- data (token
layout, tokenizers, packing, loading) <- model and kernels (the transformer, its Triton kernels,
checkpoints) <- runtime (the compiled agent, its engine, evaluation) <- train (a training run's
checkpoints, starting model, metrics). train.py and infer.py at the repository root use it; it
never imports them."""
