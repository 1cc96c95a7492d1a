"""The LLaVA VLM, its prompt formats and collator, and the DS-VLM wrapper with the diffusion branch."""
