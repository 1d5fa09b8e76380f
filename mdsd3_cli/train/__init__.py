"""`mdsd3 train`: the training data (paired sources) and the run (the Trainer)."""
