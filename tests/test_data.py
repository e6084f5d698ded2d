import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from addpipe.train.config import DataConfig
from addpipe.train.data import ShardError, TrainingData, expand_shards


def config(shards, **kw):
    return DataConfig(shards=str(shards), resolution=16, batch_size=kw.pop("batch_size", 4),
                      num_workers=kw.pop("num_workers", 0), **kw)


def take(data, n):
    return [next(data) for _ in range(n)]


def test_batches_have_the_training_shape(digit_shards):
    batch = next(TrainingData(config(digit_shards), 0, 1))
    assert batch.pixels.shape == (4, 3, 16, 16)
    assert batch.pixels.min() >= -1 and batch.pixels.max() <= 1
    assert len(batch.captions) == 4 and batch.captions[0].startswith("a handwritten")
    assert batch.original_sizes.tolist()[0] == [16, 16] and batch.crops.shape == (4, 2)


def test_missing_shards_are_named(tmp_path, digit_shards):
    with pytest.raises(ShardError, match="2 of 3 shards are missing"):
        expand_shards(f"{digit_shards}/{{00000..00002}}.tar".replace("00000..00002", "00007..00009"))
    with pytest.raises(ShardError, match="empty"):
        expand_shards("")
    assert len(expand_shards(str(digit_shards))) == 8


def test_resumed_stream_continues_with_the_next_sample(digit_shards):
    uninterrupted = take(TrainingData(config(digit_shards), 0, 1), 30)  # 120 samples: wraps into epoch 1
    first = TrainingData(config(digit_shards), 0, 1)
    take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = take(TrainingData(config(digit_shards), 0, 1, state), 17)
    for a, b in zip(uninterrupted[13:], resumed):
        assert a.captions == b.captions
        torch.testing.assert_close(a.pixels, b.pixels)


def test_global_batch_does_not_depend_on_rank_split(digit_shards):
    one_rank = take(TrainingData(config(digit_shards, batch_size=4, num_workers=2), 0, 1), 5)
    rank0 = take(TrainingData(config(digit_shards, batch_size=2, num_workers=1), 0, 2), 5)
    rank1 = take(TrainingData(config(digit_shards, batch_size=2, num_workers=1), 1, 2), 5)
    for whole, a, b in zip(one_rank, rank0, rank1):
        assert whole.captions == a.captions + b.captions
        assert whole.streams == a.streams + b.streams == [0, 0, 1, 1]


def test_workers_read_disjoint_shards(digit_shards):
    data = TrainingData(config(digit_shards, batch_size=4, num_workers=2), 0, 1)
    batches = take(data, 6)  # 24 samples of 96: one epoch's first part
    keys = [c for b in batches for c in b.captions]
    assert len(keys) == 24 and data.states[0].epoch == 0 and data.states[1].epoch == 0


def _jpeg(color):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 24), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "good0", "jpg": _jpeg("red"), "txt": "red"})
        writer.write({"__key__": "broken", "jpg": b"not a jpeg at all", "txt": "broken"})
        writer.write({"__key__": "truncated", "jpg": _jpeg("blue")[:40], "txt": "truncated"})
        writer.write({"__key__": "nocaption", "jpg": _jpeg("green")})
        writer.write({"__key__": "good1", "jpg": _jpeg("white"), "txt": "white"})
    data = TrainingData(config(path, batch_size=2), 0, 1)
    batch = next(data)
    assert batch.captions == ["red", "white"]
    assert data.skipped == 3
    assert data.state_dict()["streams"]["0"]["skipped"] == 3


def test_too_few_shards_for_streams_is_a_clear_error(tmp_path, digit_shards):
    with pytest.raises(ShardError, match="cannot feed 16 data streams"):
        TrainingData(config(digit_shards, batch_size=8, num_workers=8), 1, 2)
