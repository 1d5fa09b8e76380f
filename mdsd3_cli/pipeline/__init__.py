"""Running the model: the loaded model with its prompts and sampler (`MDSD3Pipeline`), the per-sample request,
input fitting, and the Python API's `Synthesizer`."""
