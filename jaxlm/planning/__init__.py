"""`jaxlm plan`: a config's memory and step time on a topology, from the compiled step (`plan`),
and the mesh splits, remat policies and micro-batches it would choose (`sweep`)."""
