"""How many images a source holds, for `imagemill estimate`: counted, or sampled when it is huge.

A listing past the limit stops; an S3 prefix is then sampled: its sub-prefixes (`/`) are listed,
a random few counted whole, and the total extrapolated. Otherwise the count says "at least".
"""

import random
from dataclasses import dataclass
from itertools import islice

from imagemill.core.images import LazyS3Client
from imagemill.pipeline.sources import S3Source, Source, is_image_name

MAX_PREFIXES = 100_000  # sub-prefixes listed for a sample: beyond that the listing itself is the cost


@dataclass(frozen=True)
class Count:
    """`images` in the source: exact when `exact`, else sampled or a lower bound, as `how` says."""

    images: int
    exact: bool
    how: str


def count_images(source: Source, limit: int, sample: int = 20, seed: int = 0) -> Count:
    """Count `source` up to `limit` images; past it, sample an S3 prefix's sub-prefixes."""
    counted = sum(1 for _ in islice(source.refs(), limit + 1))
    if counted <= limit:
        return Count(counted, True, "counted")
    if isinstance(source, S3Source):
        sampled = _sample_sub_prefixes(source, limit, sample, seed)
        if sampled is not None:
            return sampled
    return Count(limit, False, f"at least {limit:,}: counting stopped there (--limit)")


def _sample_sub_prefixes(source: S3Source, limit: int, sample: int, seed: int) -> Count | None:
    """Top-level images counted, `sample` sub-prefixes counted whole (each within its share of
    `limit`), the rest extrapolated from their mean; None when a sample cannot say (too few
    sub-prefixes, or one too large to count within its share)."""
    client = source.client.get() if isinstance(source.client, LazyS3Client) else source.client
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.prefix, Delimiter="/")
    prefixes: list[str] = []
    top = 0
    for page in pages:
        prefixes += [entry["Prefix"] for entry in page.get("CommonPrefixes", [])]
        top += sum(1 for obj in page.get("Contents", []) if is_image_name(obj["Key"]))
        if len(prefixes) >= MAX_PREFIXES:
            return None
    if len(prefixes) < 2:
        return None
    chosen = random.Random(seed).sample(prefixes, min(sample, len(prefixes)))
    share = max(limit // len(chosen), 1)
    counts = []
    for prefix in chosen:
        part = S3Source(source.bucket, prefix, source.client, source.page_size)
        n = sum(1 for _ in islice(part.refs(), share + 1))
        if n > share:
            return None
        counts.append(n)
    total = top + round(sum(counts) / len(counts) * len(prefixes))
    return Count(
        total, False, f"sampled: {len(chosen)} of {len(prefixes):,} sub-prefixes counted, the rest extrapolated"
    )
