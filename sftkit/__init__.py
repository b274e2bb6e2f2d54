"""sftkit: thin helpers for a notebook-first SFT cookbook on the Hugging Face stack.

Submodules (``sftkit.device``, ``sftkit.loading``, ``sftkit.evaluation``, ...) are imported
explicitly by the notebooks; nothing heavy is imported here so ``import sftkit`` stays cheap.
"""

__version__ = "0.1.0"
