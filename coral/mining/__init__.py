"""MegaPairs pair mining: FAISS kNN per encoder, similarity bands, union across encoders, hard negatives."""
