"""`mdsd3 train`: the training data (paired sources), the step (trainable sets, loss), checkpoints, previews,
the log and summary, and the run (a plan, a state and the loop over it)."""
