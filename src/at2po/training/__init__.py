"""Training: the RL trainer (``trainer``: rollout → credit → update, checkpoints, logging) and the
supervised warm start on demonstrations (``sft``)."""
