"""Data curation in the style of DINOv2's LVD-142M pipeline, on Faiss (`dinokit curate ...`).

- `embed`: L2-normalised float16 embeddings of an image pool, resumable shards (`embed.py`);
- `dedup`: self-deduplication (k-NN graph, connected components) and relative deduplication
  against evaluation sets (`dedup.py`);
- `retrieve`: sample- and cluster-based retrieval from seed sets (`retrieve.py`);
- `cluster`: hierarchical k-means and balanced sampling (`cluster.py`);
- `build`: the curated file list for `dinokit train` (`build.py`); `report`: counts and pictures.

Faiss index choice, streaming and the IVF self-join live in `index.py`; see docs/curation.md.
"""
