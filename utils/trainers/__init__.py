"""One module per training method; each gives the loop (utils/training.py) a Trainable: what to optimise, how a
batch conditions the model, and how its state is saved and read back; and a files writer for what users get.

- ``textual_inversion``: new token vectors spliced into the frozen text encoder(s); A1111 / diffusers / kohya files.
- ``hypernetwork``: A1111 hypernetwork modules in the UNet's cross-attention; A1111 ``.pt`` and ``.safetensors``.
- ``many_embeddings``: K textual-inversion embeddings through one frozen model (``--concepts`` / ``--sweep``), each
  written as its own single run.

See docs/architecture.md for the interface.
"""
