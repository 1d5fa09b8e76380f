"""The method in torch: attention heads, the MDSD3 transformer, the pixel codec, SD3 folders, adapter config
and weights, prompt embeddings and the sampler; presets/ holds the shipped mini model, its builder and the
synthetic degradations it was trained on."""
