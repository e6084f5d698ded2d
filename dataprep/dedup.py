"""Near-duplicate removal across all shards by cosine similarity of L2-normalised image embeddings.

Greedy in a fixed order (shard, key): a row is a duplicate when its similarity to any *earlier kept*
row reaches the threshold, so of a group of copies exactly the first survives. Both backends compute the
same thing block by block, so memory is block_size x kept rows, never N x N:
- blockwise: the block against the kept rows (torch matmuls, exact);
- faiss: the kept rows live in a faiss index (Flat is exact; IVF/HNSW strings trade exactness for scale).
Within a block the earlier-kept check is a short sequential sweep over the block's own similarity matrix.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)


def _blocks(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(count, start + size))


def _sweep(within: np.ndarray, duplicate: np.ndarray, nearest: np.ndarray, threshold: float) -> None:
    """Within one block, in order: a row is a duplicate of an earlier kept row of the same block."""
    for i in range(1, len(duplicate)):
        if duplicate[i]:
            continue
        earlier = within[i, :i][~duplicate[:i]]
        if earlier.size:
            best = float(earlier.max())
            nearest[i] = max(nearest[i], best)
            if best >= threshold:
                duplicate[i] = True


def near_duplicates(embeddings: np.ndarray, threshold: float, block_size: int = 8192, backend: str = "blockwise",
                    faiss_index: str = "Flat") -> tuple[np.ndarray, np.ndarray]:
    """-> (duplicate mask, similarity to the nearest earlier kept row; -1 where there is none)."""
    count = len(embeddings)
    duplicate = np.zeros(count, dtype=bool)
    nearest = np.full(count, -1.0, dtype=np.float32)
    if count == 0:
        return duplicate, nearest
    index = None
    if backend == "faiss":
        try:
            import faiss
        except ImportError as error:
            raise RuntimeError("dedup.backend=faiss needs faiss (pip install faiss-cpu or faiss-gpu)") from error
        index = faiss.index_factory(embeddings.shape[1], faiss_index, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            sample = embeddings[np.sort(rng.choice(count, size=min(count, 256 * 1024), replace=False))]
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
    kept_blocks: list[torch.Tensor] = []
    for block_slice in tqdm(list(_blocks(count, block_size)), desc="dedup", leave=False, disable=None):
        block = np.ascontiguousarray(embeddings[block_slice], dtype=np.float32)
        block_nearest = np.full(len(block), -1.0, dtype=np.float32)
        if index is not None:
            if index.ntotal:
                block_nearest = index.search(block, 1)[0][:, 0].astype(np.float32)
        else:
            query = torch.from_numpy(block)
            for kept in kept_blocks:
                block_nearest = np.maximum(block_nearest, (query @ kept.T).max(dim=1).values.numpy())
        block_duplicate = block_nearest >= threshold
        _sweep(block @ block.T, block_duplicate, block_nearest, threshold)
        kept = block[~block_duplicate]
        if len(kept):
            if index is not None:
                index.add(kept)
            else:
                kept_blocks.append(torch.from_numpy(kept))
        duplicate[block_slice] = block_duplicate
        nearest[block_slice] = block_nearest
    return duplicate, nearest
