"""The diffusion supervision branch (training only): removable by construction, the VLM never imports it."""
