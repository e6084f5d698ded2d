import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from addpipe.train.config import DataConfig
from addpipe.shards import ShardError, expand_shards
from addpipe.train.data import TrainingData


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


def _tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_without_one_usable_sample_stop_with_the_reasons_instead_of_looping(tmp_path, workers, caplog):
    """An empty tar, a zero-byte tar, and shards whose every sample is unusable: each ends within seconds with an
    error naming the shards and why, after one pass over all of them; each shard is warned about once."""
    import time

    empty = _tar(tmp_path / "empty.tar", [])
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    broken = _tar(tmp_path / "broken.tar", [{"__key__": f"{i:03d}", "jpg": b"not an image", "txt": "a caption"} for i in range(5)])
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    uncaptioned = _tar(tmp_path / "uncaptioned.tar", [{"__key__": f"{i:03d}", "png": buffer.getvalue()} for i in range(4)])
    cases = [(str(empty), {"empty.tar": "no samples"}), (str(zero), {"zero.tar": "unreadable after 0 samples"}),
             (f"{broken}::{uncaptioned}", {"broken.tar": "5 of 5 samples unusable (first: UnidentifiedImageError",
                                           "uncaptioned.tar": "4 of 4 samples unusable (first: ValueError: sample 000 has no 'txt'"})]
    for spec, reasons in cases:
        caplog.clear()
        started = time.monotonic()
        with pytest.raises(ShardError) as raised:
            next(TrainingData(config(spec, batch_size=2, num_workers=workers), 0, 1))
        message = str(raised.value)
        assert time.monotonic() - started < 30
        assert message.startswith(f"no usable sample in a full pass over all {len(reasons)} shard(s)"), message
        assert "Traceback" not in message
        for name, reason in reasons.items():
            assert f"{name}: {reason}" in message, message
        if workers == 0:  # the warnings come from this process (a worker's go to its own log)
            warned = [r.getMessage() for r in caplog.records if "later passes over it are not reported" in r.getMessage()]
            assert sorted(w.split(":")[0] for w in warned) == sorted(f"shard {tmp_path / n}" for n in reasons)


def test_one_good_shard_among_bad_ones_keeps_training(tmp_path, digit_shards):
    good = sorted(digit_shards.glob("*.tar"))[0]
    empty = _tar(tmp_path / "empty.tar", [])
    data = TrainingData(config(f"{empty}::{good}", batch_size=4), 0, 1)
    batches = take(data, 10)  # 40 samples from a 12-sample shard: several epochs over the empty one too
    assert all(len(b.captions) == 4 for b in batches)
