"""What a sample is conditioned on: attribute labels, prompts, words files, target distributions."""
