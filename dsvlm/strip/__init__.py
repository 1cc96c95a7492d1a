"""`dsvlm strip`: the trained model without its diffusion branch, as a standard LLaVA checkpoint."""
