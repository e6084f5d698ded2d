"""The curation stage's config tree (`addpipe prep`). Defaults suit LAION-style URL tables.

Field docstrings are read back for `--dry-run` and for the error listing valid keys.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from addpipe.assets import ASSET_URL
from addpipe.clip import EmbedConfig  # the embed: section; the core's, as evaluation names CLIP models with it too

AESTHETIC_WEIGHTS_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)


@dataclass
class InputConfig:
    urls: str = ""
    """The URL table: a parquet, CSV/TSV or JSON-lines file (optionally .gz), or a directory of them."""
    format: Literal["auto", "parquet", "csv", "csv.gz", "tsv", "tsv.gz", "jsonl", "jsonl.gz", "json", "json.gz"] = "auto"
    """Input format; auto: from the file suffix."""
    url_column: str = "url"
    """Column holding the image URL (LAION: URL)."""
    caption_column: str = "caption"
    """Column holding the caption (LAION: TEXT). Every other column is carried into each sample's json."""


@dataclass
class DownloadConfig:
    image_size: int = 512
    """img2dataset target size (see resize_mode)."""
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    """img2dataset resize mode; keep_ratio makes the shorter side image_size so the trainer can crop."""
    resize_only_if_bigger: bool = True
    """Never upscale: small originals stay small (the resolution filter judges the original size anyway)."""
    min_image_size: int = 0
    """img2dataset drops images whose shorter side is below this at download time (0: keep, let filter.min_resolution decide)."""
    max_image_area: float = 89478485.0
    """Images with more pixels than this are refused at download (PIL's decompression-bomb limit)."""
    max_aspect_ratio: Optional[float] = None
    """img2dataset refuses images with a larger aspect ratio at download (None: keep, let filter.max_aspect_ratio decide)."""
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    """Image format written into the shards."""
    encode_quality: int = 95
    """JPEG/WebP quality (0-100) of re-encoded images; for png the zlib compression level (0-9)."""
    processes: int = 4
    """Download processes (img2dataset processes_count)."""
    threads: int = 64
    """Download threads per process."""
    timeout: int = 10
    """Seconds before one HTTP request is abandoned."""
    retries: int = 0
    """Retries of a failed download."""
    user_agent_token: Optional[str] = "addpipe"
    """Token added to the User-Agent, also matched against X-Robots-Tag directives aimed at a specific agent."""
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    """X-Robots-Tag directives that opt an image out; such rows are not downloaded. Empty list: ignore the header."""
    samples_per_shard: int = 10000
    """Input rows per shard. Shard i of the output covers the same input rows as shard i of the download."""
    distributor: Literal["multiprocessing", "pyspark"] = "multiprocessing"
    """img2dataset's distributor; pyspark runs on download.spark_master, else on the active SparkSession (or a local
    one), and needs pyspark installed."""
    spark_master: Optional[str] = None
    """With distributor=pyspark: the cluster to run on (spark://HOST:7077, yarn, local[8]); the session is started and
    stopped around the download, and its executors run this Python. None: the active SparkSession, else a local one."""
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    """URL schemes that may be fetched. Any other (file:, ftp:, data:, a relative path ...) is a failed row with the reason
    'scheme not allowed: <scheme>', never opened: img2dataset's urllib would read local files and decode data: URLs.
    Every redirect hop obeys it too (a refused hop: 'redirect refused: scheme not allowed: <scheme>')."""
    allowed_file_roots: list[str] = field(default_factory=list)
    """Directories that `file:` URLs may read, with `file` in allowed_schemes (`addpipe prep --images DIR` sets both):
    a file outside them, symbolic links resolved, is a failed row 'file outside the allowed roots'. `file` may not be
    allowed without them."""
    allowed_networks: list[str] = field(default_factory=list)
    """Non-global networks that may be fetched from, in CIDR form (e.g. [127.0.0.1/32] for a loopback test server,
    [10.1.0.0/16] for an intranet mirror). Any other loopback, private, link-local, multicast or reserved address
    (IPv6 and IPv4-mapped forms included), of the table's hosts and of every redirect hop, after DNS resolution, is
    refused before a connection is made: 'address not allowed: private' (loopback, link-local ...). Empty: public only."""

    def __post_init__(self) -> None:
        self.allowed_schemes = [str(s).strip().lower() for s in self.allowed_schemes]
        if not self.allowed_schemes or not all(self.allowed_schemes):
            raise ValueError(f"download.allowed_schemes must name at least one scheme (e.g. [http, https]), got {self.allowed_schemes}")
        if "file" in self.allowed_schemes and not self.allowed_file_roots:
            raise ValueError("download.allowed_schemes includes file: name the directories it may read in "
                             "download.allowed_file_roots (addpipe prep --images DIR sets both)")
        self.allowed_file_roots = [os.path.realpath(os.path.expanduser(str(r))) for r in self.allowed_file_roots]
        try:
            self.allowed_networks = [str(ipaddress.ip_network(str(n).strip(), strict=False)) for n in self.allowed_networks]
        except ValueError as error:
            raise ValueError(f"download.allowed_networks must list networks in CIDR form (127.0.0.1/32, 10.0.0.0/8, ::1/128): "
                             f"{error}") from None
        limit = 9 if self.encode_format == "png" else 100
        if not 0 <= self.encode_quality <= limit:
            raise ValueError(f"download.encode_quality={self.encode_quality} is out of range for {self.encode_format}: "
                             f"0-{limit}" + (" (png: the compression level)" if limit == 9 else ""))


@dataclass
class FilterConfig:
    min_caption_words: int = 2
    """Drop captions with fewer words (an empty or missing caption has zero)."""
    min_caption_chars: int = 5
    """Drop captions with fewer characters after stripping whitespace."""
    min_resolution: int = 256
    """Drop images whose original shorter side is smaller."""
    max_aspect_ratio: float = 3.0
    """Drop images whose original long/short side ratio is larger."""
    watermark_column: str = "pwatermark"
    """Input column with a watermark probability (LAION's pwatermark); ignored when the input lacks it."""
    max_watermark: Optional[float] = 0.5
    """Drop rows whose watermark probability is above this (None: keep all)."""
    unsafe_column: str = "punsafe"
    """Input column with an unsafe-content probability (LAION's punsafe); ignored when the input lacks it."""
    max_unsafe: Optional[float] = 0.5
    """Drop rows whose unsafe probability is above this (None: keep all)."""
    min_clip_similarity: Optional[float] = 0.28
    """Drop rows whose image-caption cosine similarity is below this (None: no threshold)."""
    clip_keep_fraction: Optional[float] = None
    """Instead or as well: keep only this top fraction (0-1] by similarity of the rows reaching the CLIP filter."""
    aesthetic_weights: Optional[str] = field(default=AESTHETIC_WEIGHTS_URL, metadata=ASSET_URL)
    """LAION improved aesthetic predictor weights (.pth state dict), local path or URL; None: no aesthetic score."""
    min_aesthetic: Optional[float] = 5.0
    """Drop rows whose aesthetic score is below this (None: score only)."""

    def __post_init__(self) -> None:
        if self.clip_keep_fraction is not None and not 0 < self.clip_keep_fraction <= 1:
            raise ValueError(f"filter.clip_keep_fraction must be in (0, 1], got {self.clip_keep_fraction}")


@dataclass
class DedupConfig:
    enabled: bool = True
    """Remove exact (same sha256) and near duplicates (image-embedding cosine >= threshold) across all shards."""
    threshold: float = 0.96
    """Cosine similarity of CLIP image embeddings at or above which a later image duplicates an earlier kept one."""
    backend: Literal["blockwise", "faiss"] = "blockwise"
    """blockwise: exact, blocks of block_size against the kept set in torch; faiss: a faiss index (pip install faiss-cpu)."""
    block_size: int = 8192
    """Rows compared at once; memory is block_size x kept rows."""
    faiss_index: str = "Flat"
    """faiss index_factory string for the faiss backend (Flat is exact; IVF4096,Flat scales to billions, approximately)."""


@dataclass
class PrepConfig:
    out: str = ""
    """Output directory: download/, embeddings/ (clip-retrieval layout), scores/, shards/, report.*"""
    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
