"""Datasets: validation and preparation of LLaVA-format data, the synthetic set, the prepared-dataset reader,
the torch Dataset over it and the VAE latent cache.

Modules are imported on demand (`from dsvlm.data.prepared import PreparedDataset`): the reader must not pull in
torch or `datasets`, and the image-checking worker processes import only `dsvlm.data.images`.
"""
