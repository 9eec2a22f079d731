"""Generation: a request (`request`) becomes a plan (`plan`: checked from configs alone),
and a plan a run (`run`: weights, batches, files) that writes a dataset folder; `generate`
is all three in one call, public as `toolkit.generate`."""
