"""A retriever checkpoint loaded for inference: features in, L2-normalised float32 embeddings out.

One loader for every place that embeds with a trained checkpoint: the index and evaluate stages' Ray Data
actors and the Serve query encoder, so a query embedded offline and one embedded by the endpoint go
through the same code.
"""

from __future__ import annotations

import numpy as np
import torch

from coral import checkpoint
from coral.config import StorageConfig
from coral.device import pick
from coral.models import loader, retrievers


class Embedder:
    def __init__(
        self,
        model: str,
        kind: str,
        storage_cfg: StorageConfig | None = None,
        device: str = "auto",
        dtype: str = "float32",
    ):
        src = checkpoint.local_dir(model, storage_cfg)
        self.device = pick(device)
        self.model = loader.load_model(src, self.device, dtype).eval()
        self.retriever = retrievers.make(kind, loader.load_processor(src))

    def __call__(self, features: list[dict]) -> np.ndarray:
        """(len(features), dim) embeddings of the retriever's ``query`` / ``candidate`` features."""
        batch = self.retriever.collate(features)  # on the CPU: ``embed`` moves it to the model
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(self.retriever.embed(self.model, batch).float(), dim=-1)
        return emb.cpu().numpy().astype(np.float32)
