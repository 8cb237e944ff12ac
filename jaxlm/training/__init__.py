"""Training: the sharded model and train state on a mesh (`setup`), the jitted step (`step`), the
optimizer (`optim`), LoRA (`lora`), Orbax checkpoints (`checkpoint`), step logs and MFU (`metrics`),
and the loop that runs them (`train`)."""
