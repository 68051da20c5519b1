"""The search layer: FAISS kNN, the retrieval index (build, load, embed a pool) and the checkpoint embedder."""
