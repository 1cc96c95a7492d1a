"""dsvlm: train LLaVA-style VLMs with diffusion supervision (DS-VLM), strip the branch, evaluate."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dsvlm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
