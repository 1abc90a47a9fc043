"""Unseen-candidate discovery (paper Sec. 3.2, from CLIP-ZSS): multi-scale K-means over frozen CLIP
dense features, mask fusion, masked-CLS embeddings; `pipeline` shards it over Ray Data."""
